"""Stage 2 -- background (bag) removal: an unsupervised, contrast-adaptive brain mask of a bagged ex vivo
hemisphere, computed out of core. :func:`brain_mask` is the entry point: :func:`fit_coarse_model` finds the brain
on a coarse copy (the fixative bright, dark or without signal, decided from the data) and :func:`refine_mask`
refines its boundary lazily at full resolution; :func:`apply_mask` zeroes what lies outside a mask. The method and
its validation are described in ``docs/method/background.md``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from numba import njit
from scipy import ndimage as ndi

# block_mean, block_centres, coarse_factors and gmm1d lived here before helm_dask.coarse: still importable from here
from .arrays import _bbox, _closing_np, _r2, _radius, _spacing3, ball, half_extent
from .coarse import (
    as_dask,
    block_centres,
    block_mean,
    check_3d,
    coarse_factors,
    dct_basis,
    fit_dct_lsq,
    gmm1d,
    n_dct_functions,
    shape3,
)
from .errors import HelmError
from .io.regions import StoreView, box_cells, chunk_edges, halo_box, pad_halo, region_map, store_view_of
from .io.store import STORE_BATCH_CHUNKS, block_batches
from .volume import affine_of, like, provenance_record, spacing_of

__all__ = ["brain_mask", "apply_mask", "block_mean", "coarse_factors", "fit_coarse_model", "gmm1d", "refine_mask"]

#: ``fluid`` choices: decided from the data, or a fixative brighter / darker than tissue, or without signal.
FLUID_CHOICES = ("auto", "bright", "dark", "none")

#: passes of the neighbour test of the full-resolution refinement (see _refine_region)
_SPECK_PASSES = 2

#: Ridge of the smooth fixative field (relative to the data term, growing with frequency squared). Fitted to the
#: bag's lining -- a shell -- the field's interior is an extrapolation: with the bias stage's 1e-3 it swung by
#: 0.6 in log between the 1 mm copies of a 1.0 mm and a 0.2 mm scan of the same template phantom (their data
#: differ by noise only); from 0.1 up, the two agree within 0.02 at every depth.
_FIELD_RIDGE = 0.1
#: Depth steps (mm from the bag's lining) of the inward growth of the fixative: each refit extrapolates the field
#: by one step only (the fixative of a 7 T scan brightens by ~0.3 in log towards the centre).
_GROWTH_STEP_MM = 4.0


# ----------------------------------------------------------------------------------------------------------
# coarse model
# ----------------------------------------------------------------------------------------------------------


def _gmm_labels(x: np.ndarray, gmm: dict) -> np.ndarray:
    """Most probable class per value (classes sorted by mean); the tails go to the extreme classes."""
    pi, mu, sd = (np.asarray(gmm[k]) for k in ("weights", "means", "sds"))
    logp = np.log(pi) - np.log(sd) - 0.5 * ((x[..., None] - mu) / sd) ** 2
    lab = np.argmax(logp, axis=-1)
    # a broad class can win far out in a tail; beyond the extreme means the extreme class is the answer
    lab = np.where(x <= mu[0], 0, lab)
    lab = np.where(x >= mu[-1], len(mu) - 1, lab)
    return lab.astype(np.int16)


def _largest_component(m: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(m)
    if n == 0:
        return np.zeros_like(m, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _faces(m: np.ndarray) -> list[bool]:
    return [
        bool(m[0].any()),
        bool(m[-1].any()),
        bool(m[:, 0].any()),
        bool(m[:, -1].any()),
        bool(m[:, :, 0].any()),
        bool(m[:, :, -1].any()),
    ]


def _closing(m: np.ndarray, radius_mm: float, spacing_c: np.ndarray) -> np.ndarray:
    """Binary closing with a ball (radius in mm), the field of view zero-padded so that its faces do not erode.

    Equal to ``ndi.binary_closing(np.pad(m, h), structure=ball(radius_mm, spacing_c))`` cropped back (``h`` the
    ball's half size), computed exactly from two Euclidean feature transforms on the mask's bounding box
    (:func:`helm_dask.arrays._closing_np`, the merge stage's kernel): scipy's closing visits the ball's ~500
    offsets per voxel, and its two closings took 3.4 of the coarse fit's 14 s on a 0.3 mm scan (now ~1.4 s).
    """
    s, r = _spacing3(spacing_c), _radius(radius_mm)
    h = half_extent(r, s)
    if max(h) == 0:
        return m
    # a voxel of the closing sees the mask within 2 h: beyond the box so grown there is nothing to close
    box = _bbox(m, tuple(2 * n for n in h))
    out = np.zeros(m.shape, dtype=bool)
    if box is None:
        return out
    closed = _closing_np(np.pad(m[box], [(n, n) for n in h]), s, _r2(r))
    out[box] = closed[tuple(slice(n, n + b.stop - b.start) for n, b in zip(h, box))]
    return out


@dataclass
class CoarseModel:
    """Everything the full-resolution refinement needs (small arrays on the coarse grid)."""

    factors: tuple[int, int, int]
    shape: tuple[int, int, int]  # full-resolution shape
    spacing_c: np.ndarray  # coarse voxel size (mm)
    mask: np.ndarray  # coarse mask (bool)
    band: np.ndarray  # coarse voxels whose children are refined (bool)
    m_brain: np.ndarray  # local tissue intensity at the brain surface (float64, image units)
    m_out: np.ndarray  # local intensity of what surrounds the brain (fluid, or the background)
    side: str  # the surrounding fluid: "bright", "dark" or "none" (no signal)
    m_air: float  # air intensity (coarse median)
    theta: float = 0.5  # tissue fraction at which a partial-volume voxel counts as brain
    fill: np.ndarray | None = None  # coarse voxels the brain holds without tissue (closed sulci, ventricles)
    cap: np.ndarray | None = None  # local upper intensity bound of tissue (bag wall), or None
    info: dict = field(default_factory=dict)


def _normconv(values: np.ndarray, weight: np.ndarray, sigma_vox: np.ndarray, fallback, lam: float = 0.02) -> np.ndarray:
    """Local weighted mean by normalised Gaussian convolution, pulled to ``fallback`` (a number or a map)
    where data are scarce. ``values`` are weighted sums (value * weight) and ``weight`` the weights."""
    num = ndi.gaussian_filter(np.asarray(values, dtype=np.float64), sigma_vox, mode="nearest")
    den = ndi.gaussian_filter(np.asarray(weight, dtype=np.float64), sigma_vox, mode="nearest")
    return (num + lam * fallback) / (den + lam)


def _robust_smooth_fit(
    logc: np.ndarray, region: np.ndarray, B: list, tol: float, n_iter: int = 4, regularization: float = 1e-3
) -> tuple[np.ndarray, float, np.ndarray]:
    """Smooth DCT field fitted to ``logc`` on ``region``, refitted on its inliers; (field, robust sd, inliers).

    The inliers are the region's voxels within ``max(tol, 3 sd)`` of the field (the sd a robust one, from the
    median absolute deviation), so a part of the region that is something else (brain pressed on the bag, a
    bubble's rim) does not bend the field."""
    sel = region
    logf = np.zeros_like(logc)
    sd = 0.0
    for _ in range(n_iter):
        _, logf = fit_dct_lsq(logc, sel.astype(np.float64), B, regularization=regularization)
        res = (logc - logf)[region]
        med = float(np.median(res))
        sd = 1.4826 * float(np.median(np.abs(res - med)))
        sel = region & (np.abs(logc - logf - med) < max(tol, 3.0 * sd))
        if sel.sum() < 8:
            sel = region
            break
    return logf, sd, sel


def _neighbour_noise(logc: np.ndarray, region: np.ndarray) -> float:
    """Noise (log units) from differences between 6-neighbours inside ``region`` (robust; sqrt(2) removed)."""
    per_axis = [
        np.abs(np.diff(logc, axis=ax))[
            (np.diff(region.astype(np.int8), axis=ax) == 0) & np.take(region, range(region.shape[ax] - 1), axis=ax)
        ]
        for ax in range(3)
    ]
    d = np.concatenate([x.ravel() for x in per_axis])
    return 1.4826 * float(np.median(d)) / math.sqrt(2.0) if d.size else 0.0


def _fill_holes_2d(m: np.ndarray) -> np.ndarray:
    """Holes filled in every slice along each axis: a ventricle or cistern opened by the hemisection is a
    cavity of the medial face, enclosed in the slices parallel to it (3-D filling cannot see it)."""
    out = m.copy()
    for ax in range(3):
        for i in range(m.shape[ax]):
            sl = tuple(i if q == ax else slice(None) for q in range(3))
            out[sl] |= ndi.binary_fill_holes(m[sl])
    return out


def _hull(cand: np.ndarray, spacing_c: np.ndarray, opening_radius_mm: float, closing_radius_mm: float) -> np.ndarray:
    """Tissue candidates -> the brain: opening (cuts thin bridges: bag wall, bubble rims, noise) -> largest
    component -> reconstruction of what the opening shaved off -> closing (sulci and their fixative) -> holes
    filled in 3-D and in slices (ventricles, open or not)."""
    se = ball(opening_radius_mm, spacing_c)
    core = ndi.binary_opening(cand, structure=se) if se.size > 1 else cand
    core = _largest_component(core)
    if not core.any():
        return core
    if se.size > 1:
        core = _largest_component(cand & ndi.binary_dilation(core, structure=se))
    if closing_radius_mm > 0:
        core = _closing(core, closing_radius_mm, spacing_c)
    return _fill_holes_2d(ndi.binary_fill_holes(core))


@dataclass
class _CoarseCopy:
    """The scan's coarse copy and its grid (what every step of :func:`fit_coarse_model` starts from)."""

    src: str | None  # the scan's path, for error messages
    spacing: np.ndarray  # full-resolution voxel size (mm)
    factors: tuple[int, int, int]
    spacing_c: np.ndarray  # coarse voxel size (mm)
    step: float  # the largest coarse voxel size (mm): the unit of the layer depths
    full_shape: tuple[int, int, int]
    c: np.ndarray  # coarse block means (float64)
    pos: np.ndarray  # c > 0


@dataclass
class _Signal:
    """Step 1's result: air and signal on the coarse grid."""

    gmm: dict  # the mixture on all positive log-intensities
    n_air: int  # its classes below the largest gap
    air: np.ndarray
    signal: np.ndarray
    n_signal: int
    m_air: float  # air intensity (coarse median)
    logc: np.ndarray  # log coarse intensities (floored)


@dataclass
class _Lining:
    """Step 2's result: the bag's contents, their lining, the lining's smooth field and the fluid cues."""

    contents: np.ndarray
    d_in: np.ndarray  # depth (mm) inside the contents
    lining: np.ndarray
    B: list[np.ndarray]  # DCT basis at the coarse block centres
    logf: np.ndarray  # the lining's own smooth log-field
    sd: float  # robust scatter of the lining about it
    lining_in: np.ndarray  # the lining's inliers
    noise: float  # neighbour noise in the lining
    tol: float  # log-ratio tolerance of "fluid"
    homogeneous: bool
    smooth_gain: float  # what a closing adds to the contents (fraction)
    smooth: bool
    thick: float  # the fluid-like layer's largest thickness (mm)
    is_fluid: bool  # the cues' verdict: the lining is a fixative with signal


@dataclass
class _Hypothesis:
    """Step 3's result under one hypothesis (a fixative with signal, or not): the side of the surrounding, the
    tissue candidates and the smooth intensity models on both sides of the surface."""

    has_fluid: bool
    side: str  # "bright", "dark" or "none"
    tau: float  # tissue / fluid (1 without a fluid)
    beta: float  # background / tissue (1 with a fluid)
    thr: float  # partial-volume threshold on J
    J: np.ndarray  # smoothed intensity relative to the smooth field
    cand: np.ndarray  # tissue candidates
    m_brain: np.ndarray  # smooth tissue intensity (image units)
    m_out: np.ndarray  # smooth intensity of what surrounds the brain
    fl: np.ndarray | None = None  # the fluid (with a fluid only)
    cap: np.ndarray | None = None  # upper intensity bound of tissue (bag wall), or None


def _check_choices(fluid: str, min_tissue_fraction: float) -> float:
    """Refuse an unknown ``fluid`` or a tissue fraction outside (0, 1); return the fraction (theta)."""
    if fluid not in FLUID_CHOICES:
        raise HelmError(
            f"fluid must be one of {', '.join(FLUID_CHOICES)}, got {fluid!r}",
            hint="auto decides from the data; bright / dark: a fixative brighter / darker than "
            "tissue; none: no signal (e.g. Fomblin)",
        )
    if not 0.0 < float(min_tissue_fraction) < 1.0:
        raise HelmError(f"min_tissue_fraction must be between 0 and 1, got {min_tissue_fraction!r}")
    return float(min_tissue_fraction)


def _coarse_copy(image: xr.DataArray, coarse_spacing_mm: float) -> _CoarseCopy:
    """The exact coarse block mean of the scan; an empty or constant scan is refused."""
    src = image.attrs.get("source") or None
    spacing = spacing_of(affine_of(image))
    factors = coarse_factors(spacing, coarse_spacing_mm)
    spacing_c = spacing * np.asarray(factors)
    full_shape = shape3(image.shape)
    c, _ = block_mean(image, factors)
    pos = c > 0
    if pos.sum() < 8 or not np.isfinite(c).all() or float(np.ptp(c[pos])) <= 1e-6 * float(c[pos].max()):
        raise HelmError(
            "the image is empty or constant (all background): no brain to find",
            path=src,
            hint="Check that the right file/echo was given and that it contains the scan.",
        )
    return _CoarseCopy(src, spacing, factors, spacing_c, float(spacing_c.max()), full_shape, c, pos)


def _air_and_signal(cc: _CoarseCopy, n_air_components: int, hist_bins: int) -> _Signal:
    """Step 1 -- air vs signal: a mixture on all log-intensities, split at the largest gap between class means."""
    c, pos, src = cc.c, cc.pos, cc.src
    logc_pos = np.log(c[pos])
    hist, edges = np.histogram(logc_pos, bins=hist_bins, range=(float(logc_pos.min()), float(logc_pos.max())))
    centres = 0.5 * (edges[:-1] + edges[1:])
    g_all = gmm1d(centres, hist, max(2, int(n_air_components)), var_floor=(edges[1] - edges[0]) ** 2)
    gaps = np.diff(g_all["means"])
    if gaps.max() < math.log(2.0):
        raise HelmError(
            "no foreground found: no signal clearly above the noise floor (all background)",
            path=src,
            hint="Check the input scan; a brain should be several times brighter than air.",
        )
    n_air = int(np.argmax(gaps)) + 1
    lab_all = np.zeros(c.shape, dtype=np.int16)
    lab_all[pos] = _gmm_labels(logc_pos, g_all)
    air = lab_all < n_air  # includes c <= 0 (a dark fixative may fall here too)
    signal = ~air
    n_signal = int(signal.sum())
    if n_signal < 64:
        raise HelmError(
            "too little signal above the noise floor to find a brain (all background?)",
            path=src,
            hint="Check the input scan.",
        )
    m_air = float(np.median(c[air])) if air.any() else 0.0
    logc = np.log(np.maximum(c, 1e-6 * float(c[pos].max())))
    return _Signal(g_all, n_air, air, signal, n_signal, m_air, logc)


def _bag_contents(cc: _CoarseCopy, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 2a -- the bag's contents: thick signal (the opening drops a thin bag wall), holes filled; their depth
    (mm) and their lining (the 2nd-3rd layers: the 1st is the partial volume of the wall)."""
    step, spacing_c = cc.step, cc.spacing_c
    se = ball(max(1.5, step), spacing_c)
    # (edge-padded: the fixative cut by a face of the field of view is not eroded away there)
    pad = max(se.shape) // 2 + 1
    contents = ndi.binary_opening(np.pad(signal, pad, mode="edge"), se)[(slice(pad, -pad),) * 3]
    contents = ndi.binary_fill_holes(_largest_component(contents))
    if contents.sum() < 64:
        raise HelmError(
            "no specimen found: no thick object with signal in the field of view",
            path=cc.src,
            hint="Check the input scan.",
        )
    # (the field of view's faces count as outside: fixative cut by them lines the contents there too, and a
    # field fitted without it would be extrapolated at the faces)
    d_in = ndi.distance_transform_edt(np.pad(contents, 1), sampling=spacing_c)[1:-1, 1:-1, 1:-1]
    lining = contents & signal & (d_in >= 1.5 * step) & (d_in <= max(3.5, 2.5 * step))
    if lining.sum() < 8:
        lining = contents & signal & (d_in <= max(3.5, 2.5 * step))
    return contents, d_in, lining


def _lining_cues(
    cc: _CoarseCopy,
    sig: _Signal,
    contents: np.ndarray,
    d_in: np.ndarray,
    lining: np.ndarray,
    fluid_tolerance: float,
    bias_basis_spacing_mm: float,
    min_fluid_thickness_mm: float,
) -> _Lining:
    """Step 2b -- a smooth DCT field fitted robustly to the lining, and the cues that tell whether the lining is a
    fixative with signal or the cortex of a specimen in a fixative without one."""
    logc, signal, spacing_c, step = sig.logc, sig.signal, cc.spacing_c, cc.step
    nbs = [n_dct_functions(n, s_, bias_basis_spacing_mm) for n, s_ in zip(cc.full_shape, cc.spacing)]
    B = [dct_basis(block_centres(n, f), n, k) for n, f, k in zip(cc.full_shape, cc.factors, nbs)]
    logf, sd, lining_in = _robust_smooth_fit(logc, lining, B, fluid_tolerance)
    noise = _neighbour_noise(logc, lining)
    tol = min(max(float(fluid_tolerance), 3.0 * sd), 0.3)
    # Three cues: (a) a fluid is homogeneous: its scatter about the smooth field is its noise (or a few per cent
    # where block means leave little noise), the cortex's is anatomy; (b) a bag of fluid is smooth: a closing adds
    # almost nothing to its contents, while a bare brain's open sulci fill; (c) a bag of fluid has pockets: a layer
    # that is thin everywhere is a cortex ribbon. A fluid needs (c) and one of (a), (b).
    homogeneous = sd <= max(1.2 * noise, 0.04)
    smooth_gain = float(_closing(contents, 4.0, spacing_c).sum()) / float(contents.sum()) - 1.0
    smooth = smooth_gain < 0.005
    # (where the lining is a poor fit -- the bag pressed on the brain over much of it -- its own scatter, so
    # that the fixative is not cut into pieces thinner than it is)
    tol_t = min(max(float(fluid_tolerance), 2.0 * noise, 2.0 * sd), 0.3)
    fluid_like = contents & signal & (np.abs(logc - logf) < tol_t)
    lab, _ = ndi.label(fluid_like)
    touching = np.unique(lab[lining & fluid_like])
    fluid_like = np.isin(lab, touching[touching > 0])
    # (twice the deepest point, less a voxel: the distance of a one-voxel layer's centre is one voxel)
    thick = (
        (2.0 * float(ndi.distance_transform_edt(fluid_like, sampling=spacing_c).max()) - step)
        if fluid_like.any()
        else 0.0
    )
    is_fluid = thick >= min_fluid_thickness_mm and (homogeneous or smooth)
    return _Lining(
        contents, d_in, lining, B, logf, sd, lining_in, noise, tol, homogeneous, smooth_gain, smooth, thick, is_fluid
    )


def _lining_info(cc: _CoarseCopy, sig: _Signal, lin: _Lining, fluid: str, theta: float) -> dict[str, Any]:
    """The fit report as far as step 2 (JSON-able)."""
    return {
        "method": "contrast-adaptive: bag contents, smooth field fitted to their lining, fluid or dark "
        "background decided from the data, partial-volume tissue threshold, hull (closing, hole "
        "filling in 3-D and in slices); full-resolution band refinement",
        "coarse_factors": [int(f) for f in cc.factors],
        "coarse_shape": [int(s) for s in cc.c.shape],
        "coarse_spacing_mm": [float(s) for s in cc.spacing_c],
        "air_gmm_log_intensity": {k: sig.gmm[k] for k in ("weights", "means", "sds", "loglik", "n_iter")},
        "air_classes": int(sig.n_air),
        "air_intensity": sig.m_air,
        "fluid": fluid,
        "min_tissue_fraction": theta,
        "lining": {
            "voxels": int(lin.lining.sum()),
            "scatter_log": lin.sd,
            "noise_log": lin.noise,
            "homogeneous": bool(lin.homogeneous),
            "closing_gain": lin.smooth_gain,
            "smooth": bool(lin.smooth),
            "max_thickness_mm": lin.thick,
            "is_fluid": bool(lin.is_fluid),
        },
    }


def _hypotheses(fluid: str, lining_is_fluid: bool) -> list[bool]:
    """The hypotheses to try, in order (True: a fixative with signal surrounds the brain).

    The one the cues (or the user) favour first; when ``auto`` chose a fixative with signal and that leaves no
    brain (the "fluid" was cortex: at fine resolutions the block means fill a bare brain's sulci, so its contents
    look as smooth as a bag), the other one -- a hypothesis that explains the bag without a brain is wrong.
    """
    if fluid in ("bright", "dark"):
        has_fluid = True
    elif fluid == "none":
        has_fluid = False
    else:
        has_fluid = lining_is_fluid
    return [has_fluid, False] if (has_fluid and fluid == "auto") else [has_fluid]


def _fluid_field(cc: _CoarseCopy, sig: _Signal, lin: _Lining, fluid_tolerance: float) -> np.ndarray:
    """Step 3a, the field: the fluid's smooth log-field, grown inwards from the lining a depth step at a time and
    refitted on all the fluid found (bag, sulci, ventricles), so that it holds inside the specimen too.

    Each refit uses the lining and the fluid clear of tissue (eroded: in sulci and ventricles the partial volume
    with tissue would pull the field towards the tissue, and the tissue next to it would look like fluid; the
    lining anchors it where the fluid is a thin layer, eroded away). It restarts from the lining with the stiff
    ridge: the first fit, which only has to describe the lining, keeps the bias stage's.
    """
    logc, signal, contents, d_in = sig.logc, sig.signal, lin.contents, lin.d_in
    logf, _, lining_in = _robust_smooth_fit(logc, lin.lining, lin.B, fluid_tolerance, regularization=_FIELD_RIDGE)
    depth = float(d_in.max())
    steps = list(np.arange(2.0 * _GROWTH_STEP_MM, depth, _GROWTH_STEP_MM)) + [depth, depth]
    for reach in steps:
        fl = contents & signal & (np.abs(logc - logf) < lin.tol) & (d_in <= reach)
        logf, _, _ = _robust_smooth_fit(
            logc,
            lining_in | (fl & ndi.binary_erosion(fl, border_value=1)),
            lin.B,
            fluid_tolerance,
            n_iter=2,
            regularization=_FIELD_RIDGE,
        )
    return logf


def _fluid_hypothesis(
    cc: _CoarseCopy, sig: _Signal, lin: _Lining, fluid: str, theta: float, fluid_tolerance: float
) -> _Hypothesis:
    """Step 3a -- a fluid with signal: intensities relative to the local fluid; the tissue facing it tells its side
    (``bright``: the fluid is brighter than tissue, ``dark``: darker)."""
    logc, signal, contents, step, src = sig.logc, sig.signal, lin.contents, cc.step, cc.src
    logf = _fluid_field(cc, sig, lin, fluid_tolerance)
    fl = contents & signal & (np.abs(logc - logf) < lin.tol)
    J = ndi.gaussian_filter(cc.c / np.exp(logf), 0.5)
    # the tissue facing the fluid (1-3 mm from it): its level relative to the fluid decides the side
    d_fl = ndi.distance_transform_edt(~fl, sampling=cc.spacing_c)
    # (2nd-3rd layers: the 1st is the partial volume of tissue and fluid)
    surf = contents & signal & ~fl & (d_fl >= 1.5 * step) & (d_fl <= 2.5 * step)
    if surf.sum() < 8:
        raise HelmError(
            "no brain found: everything inside the bag looks like the fluid",
            path=src,
            hint="Check the scan; if the fixative gives no signal (e.g. Fomblin), use --fluid none.",
        )
    tau = float(np.median(J[surf]))
    side = "bright" if tau < 1.0 else "dark"
    if fluid in ("bright", "dark") and side != fluid:
        raise HelmError(
            f"--fluid {fluid} was given, but the fixative lining the bag is "
            f"{'brighter' if side == 'bright' else 'darker'} than the tissue it touches "
            f"(tissue/fluid = {tau:.2f})",
            path=src,
            hint="use --fluid auto (or the other side)",
        )
    thr = 1.0 + theta * (tau - 1.0)
    cand = signal & contents & ((J < thr) if side == "bright" else (J > thr))
    ref = np.exp(logf)
    return _Hypothesis(True, side, tau, 1.0, thr, J, cand, m_brain=tau * ref, m_out=ref, fl=fl)


def _no_fluid_hypothesis(cc: _CoarseCopy, sig: _Signal, lin: _Lining, theta: float, info: dict) -> _Hypothesis:
    """Step 3b -- no fluid signal (or one darker than the noise floor): the lining is the tissue; intensities are
    relative to it, and the background is what lies just outside the specimen (``dark`` when its spread is a
    signal's, ``none`` when it is noise's; recorded in ``info["background_spread"]``)."""
    step, logc = cc.step, sig.logc
    J = ndi.gaussian_filter(cc.c / np.exp(lin.logf), 0.5)
    d_out = ndi.distance_transform_edt(~lin.contents, sampling=cc.spacing_c)
    around = ~lin.contents & ~sig.signal & (d_out <= max(3.0, 2.0 * step))
    level = np.exp(lin.logf)
    beta = float(np.median(J[around])) if around.sum() >= 8 else float(sig.m_air / np.median(level[lin.lining]))
    tau = 1.0
    thr = beta + theta * (1.0 - beta)
    # (not beyond the specimen's partial-volume rim: farther out the field is an extrapolation, and noise divided
    # by it can pass any threshold -- seen on a 0.2 mm scan: the mask took the whole bag)
    cand = (d_out <= max(3.0, 2.0 * step)) & (J > thr)
    # what surrounds it: a dark fixative, or nothing (noise only). Its spread relative to its level, from
    # differences of neighbouring coarse voxels (a smooth trend does not count) scaled back to one voxel of the scan
    # (a coarse voxel averages n of them, dividing the spread of noise by sqrt(n): unscaled, the cue read 0.80 on a
    # 1 mm and 0.26 on a 0.5 mm scan of the same bag of noise). Noise magnitudes (Rayleigh) spread by 0.52 of their
    # level whatever it is; a fixative with signal by its noise over its level (0.14 at 7:1 signal-to-noise).
    bg_spread = 1.0
    if around.sum() >= 8:
        bg_spread = _neighbour_noise(logc, around) * math.sqrt(float(np.prod(cc.factors)))
    side = "dark" if bg_spread < 0.3 else "none"
    info["background_spread"] = bg_spread
    return _Hypothesis(False, side, tau, beta, thr, J, cand, m_brain=level, m_out=beta * level)


def _cap_bag_wall(hyp: _Hypothesis, d_in: np.ndarray, step: float) -> None:
    """Where tissue is the brighter class, the bag wall (or anything far brighter than the brightest tissue) is not
    brain: drop it from the candidates and set the cap. The tissue's range comes from the candidates clear of the
    contents' edge (where a wall pressed on the brain lies)."""
    core0 = hyp.cand & (d_in >= 2.0 * step)
    if hyp.side != "bright" and core0.sum() >= 8:
        cap_rel = 1.3 * float(np.percentile(hyp.J[core0], 99)) / hyp.tau
        hyp.cand &= hyp.J <= cap_rel * hyp.tau
        hyp.cap = cap_rel * hyp.m_brain


def _hypothesis(
    has_fluid: bool,
    cc: _CoarseCopy,
    sig: _Signal,
    lin: _Lining,
    info: dict,
    fluid: str,
    theta: float,
    fluid_tolerance: float,
) -> _Hypothesis:
    """Step 3 under one hypothesis: 3a or 3b, then the bag-wall cap; its decisions go into ``info``."""
    if has_fluid:
        hyp = _fluid_hypothesis(cc, sig, lin, fluid, theta, fluid_tolerance)
    else:
        hyp = _no_fluid_hypothesis(cc, sig, lin, theta, info)
    _cap_bag_wall(hyp, lin.d_in, cc.step)
    info.update(
        {
            "fluid_side": hyp.side,
            "tissue_to_fluid": hyp.tau if has_fluid else None,
            "background_to_tissue": None if has_fluid else hyp.beta,
            "threshold_relative": hyp.thr,
            "fluid_tolerance_used": lin.tol,
        }
    )
    return hyp


def _too_small(mask_c: np.ndarray, n_signal: int) -> str:
    return f"the largest tissue component holds only {100 * mask_c.sum() / n_signal:.1f}% of the signal voxels"


def _check_brain(
    mask_c: np.ndarray, n_signal: int, min_brain_fraction: float, max_fov_fraction: float, src: str | None
) -> float:
    """Refuse a coarse brain that is too small or that fills the field of view; return its fraction of it."""
    if mask_c.sum() < min_brain_fraction * n_signal:
        raise HelmError(
            "no brain found: the largest tissue component holds only "
            f"{100 * mask_c.sum() / n_signal:.1f}% of the signal voxels "
            f"(< {100 * min_brain_fraction:g}%)",
            path=src,
            hint="Check the input; try a smaller coarse_spacing_mm or opening_radius_mm.",
        )
    frac = float(mask_c.sum()) / mask_c.size
    if all(_faces(mask_c)) or frac > max_fov_fraction:
        raise HelmError(
            f"the brain mask touches {sum(_faces(mask_c))} of the 6 faces of the field of view and "
            f"covers {100 * frac:.0f}% of it: the bag/fluid was not removed",
            path=src,
            hint="Check the scan (is there fluid or air around the specimen?) or set --fluid explicitly.",
        )
    return frac


def _local_intensities(
    cc: _CoarseCopy,
    sig: _Signal,
    hyp: _Hypothesis,
    mask_c: np.ndarray,
    din: np.ndarray,
    dout: np.ndarray,
    local_sigma_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 5 -- local intensities on both sides of the surface (image units), for the per-voxel rule.

    The smooth models of step 3, pulled to the local means of the tissue under the surface (2nd layer) and of what
    lies just outside it: a smooth field misses a few per cent here and there, and the partial-volume threshold
    sits at 20% of the contrast.
    """
    step, spacing_c = cc.step, cc.spacing_c
    sig_l = np.maximum(local_sigma_mm / spacing_c, 1.0)
    # (clear tissue only: more than half tissue by the smooth models, 2nd-3rd layers)
    mid = (1.0 + 0.5 * (hyp.tau - 1.0)) if hyp.has_fluid else (hyp.beta + 0.5 * (1.0 - hyp.beta))
    clear = (hyp.J < mid) if hyp.side == "bright" else (hyp.J > mid)
    w_in = (mask_c & hyp.cand & clear & (din >= 1.5 * step) & (din <= 3.5 * step)).astype(np.float64)
    if hyp.has_fluid:
        assert hyp.fl is not None  # set by every fluid hypothesis
        outside = hyp.fl & ~mask_c
    else:
        outside = ~mask_c & ~hyp.cand & ~sig.signal
    w_out = (outside & (dout <= max(3.0, 2.0 * step))).astype(np.float64)
    m_brain = _normconv(cc.c * w_in, w_in, sig_l, hyp.m_brain)
    m_out = _normconv(cc.c * w_out, w_out, sig_l, hyp.m_out)
    return m_brain, m_out


def _band(
    mask_c: np.ndarray,
    din: np.ndarray,
    dout: np.ndarray,
    band_mm: float | None,
    band_out_mm: float | None,
    step: float,
) -> tuple[np.ndarray, float, float]:
    """Step 6 -- the boundary band refined at full resolution (and the widths used, defaults 1.5 and 1 step)."""
    band_mm = float(band_mm) if band_mm is not None else 1.5 * step
    band_out_mm = float(band_out_mm) if band_out_mm is not None else 1.0 * step
    band = (mask_c & (din <= band_mm)) | (~mask_c & (dout <= band_out_mm))
    return band, band_mm, band_out_mm


def _coarse_result(
    cc: _CoarseCopy,
    sig: _Signal,
    hyp: _Hypothesis,
    mask_c: np.ndarray,
    info: dict[str, Any],
    *,
    frac: float,
    theta: float,
    band_mm: float | None,
    band_out_mm: float | None,
    local_sigma_mm: float,
    opening_radius_mm: float,
    closing_radius_mm: float,
) -> CoarseModel:
    """Steps 5 and 6 on the coarse brain ``mask_c`` (covering ``frac`` of the field of view), and the model."""
    step, spacing_c = cc.step, cc.spacing_c
    din = ndi.distance_transform_edt(mask_c, sampling=spacing_c)
    dout = ndi.distance_transform_edt(~mask_c, sampling=spacing_c)
    m_brain, m_out = _local_intensities(cc, sig, hyp, mask_c, din, dout, local_sigma_mm)
    band, band_mm, band_out_mm = _band(mask_c, din, dout, band_mm, band_out_mm, step)
    info.update(
        {
            "coarse_component_voxels": int(mask_c.sum()),
            "coarse_component_mm3": float(mask_c.sum() * np.prod(spacing_c)),
            "fov_fraction": frac,
            "faces_touched": int(sum(_faces(mask_c))),
            "brain_intensity": float(np.median(m_brain[mask_c])),
            "fluid_intensity": float(np.median(m_out[mask_c])) if hyp.side != "none" else None,
            "band_mm": band_mm,
            "band_out_mm": band_out_mm,
            "local_sigma_mm": float(local_sigma_mm),
            "opening_radius_mm": float(opening_radius_mm),
            "closing_radius_mm": float(closing_radius_mm),
        }
    )
    return CoarseModel(
        factors=cc.factors,
        shape=cc.full_shape,
        spacing_c=spacing_c,
        mask=mask_c,
        band=band,
        m_brain=np.asarray(m_brain, np.float64),
        m_out=np.asarray(m_out, np.float64),
        side=hyp.side,
        m_air=sig.m_air,
        theta=theta,
        fill=mask_c & ~hyp.cand & (din > 1.5 * step),
        cap=None if hyp.cap is None else np.asarray(hyp.cap, np.float64),
        info=info,
    )


def fit_coarse_model(
    image: xr.DataArray,
    *,
    coarse_spacing_mm: float = 1.0,
    fluid: str = "auto",
    fluid_tolerance: float = 0.12,
    bias_basis_spacing_mm: float = 50.0,
    opening_radius_mm: float = 2.0,
    closing_radius_mm: float = 5.0,
    min_tissue_fraction: float = 0.2,
    band_mm: float | None = None,
    band_out_mm: float | None = None,
    local_sigma_mm: float = 2.0,
    max_fov_fraction: float = 0.9,
    min_brain_fraction: float = 0.05,
    min_fluid_thickness_mm: float = 5.0,
    n_air_components: int = 5,
    hist_bins: int = 1024,
) -> CoarseModel:
    """Coarse pass of :func:`brain_mask` (eager; memory ~ the coarse grid); the method is described in
    ``docs/method/background.md`` (steps 1-6 there are the steps here).

    Parameters
    ----------
    image : DataArray
        3-D image volume (any affine).
    coarse_spacing_mm, fluid, fluid_tolerance, bias_basis_spacing_mm, opening_radius_mm, closing_radius_mm
        As in :func:`brain_mask`.
    min_tissue_fraction, band_mm, band_out_mm, local_sigma_mm, max_fov_fraction, min_brain_fraction
        As in :func:`brain_mask`.
    min_fluid_thickness_mm : float
        A lining is a fixative with signal only if the fluid-like layer is this thick somewhere (a bag has
        pockets, a cortex ribbon does not).
    n_air_components, hist_bins : int
        Classes and histogram bins of the air / signal mixture on the coarse log-intensities.

    Returns
    -------
    CoarseModel
        The coarse mask, the boundary band and the local tissue / surrounding intensity maps that the
        full-resolution rule of :func:`refine_mask` uses; ``info`` holds the decisions (JSON-able).

    Raises
    ------
    HelmError
        As :func:`brain_mask`.
    """
    check_3d(image, "image")
    theta = _check_choices(fluid, min_tissue_fraction)
    cc = _coarse_copy(image, coarse_spacing_mm)
    sig = _air_and_signal(cc, n_air_components, hist_bins)
    contents, d_in, lining = _bag_contents(cc, sig.signal)
    lin = _lining_cues(cc, sig, contents, d_in, lining, fluid_tolerance, bias_basis_spacing_mm, min_fluid_thickness_mm)
    info = _lining_info(cc, sig, lin, fluid, theta)
    attempts = _hypotheses(fluid, lin.is_fluid)
    for attempt, has_fluid in enumerate(attempts):
        last = attempt == len(attempts) - 1
        try:
            hyp = _hypothesis(has_fluid, cc, sig, lin, info, fluid, theta, fluid_tolerance)
            # step 4 -- the brain: one connected component, sulci closed, ventricles filled
            mask_c = _hull(hyp.cand, cc.spacing_c, opening_radius_mm, closing_radius_mm)
        except HelmError as e:
            if last:
                raise
            info["rejected"] = {"fluid_with_signal": True, "reason": e.message}
            continue
        if last or mask_c.sum() >= min_brain_fraction * sig.n_signal:
            break
        info["rejected"] = {"fluid_with_signal": True, "reason": _too_small(mask_c, sig.n_signal)}
    frac = _check_brain(mask_c, sig.n_signal, min_brain_fraction, max_fov_fraction, cc.src)
    return _coarse_result(
        cc,
        sig,
        hyp,
        mask_c,
        info,
        frac=frac,
        theta=theta,
        band_mm=band_mm,
        band_out_mm=band_out_mm,
        local_sigma_mm=local_sigma_mm,
        opening_radius_mm=opening_radius_mm,
        closing_radius_mm=closing_radius_mm,
    )


# ----------------------------------------------------------------------------------------------------------
# full-resolution passes (band statistics, refinement)
# ----------------------------------------------------------------------------------------------------------


def _axis_weights(idx_ax: np.ndarray, n: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower corner and weight of the linear interpolation of coarse voxels (centred on ``j * f + (f - 1) / 2``)
    at the global full-resolution indices ``idx_ax`` of one axis of ``n > 1`` coarse voxels (clamped outside)."""
    q = np.clip((idx_ax - (f - 1) / 2.0) / f, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(q).astype(np.intp), n - 2)
    return i0, q - i0


def _lerp_axis(out: np.ndarray, idx_ax: np.ndarray, n: int, f: int, off: int, ax: int) -> np.ndarray:
    """``out`` (coarse along ``ax``, starting at coarse index ``off`` of ``n``) interpolated along ``ax`` at the
    global full-resolution indices ``idx_ax``: one axis of :func:`_trilinear`."""
    if n == 1:
        return np.repeat(out, idx_ax.size, axis=ax)
    i0, w = _axis_weights(idx_ax, n, f)
    shape = [1] * out.ndim
    shape[ax] = idx_ax.size
    w = w.reshape(shape)
    lo = int(i0.min())
    sub = np.take(out, np.arange(lo, int(i0.max()) + 2) - off, axis=ax)
    return np.take(sub, i0 - lo, axis=ax) * (1.0 - w) + np.take(sub, i0 + 1 - lo, axis=ax) * w


def _trilinear(
    coarse: np.ndarray,
    idx: list[np.ndarray],
    factors: tuple[int, ...],
    offset: tuple[int, ...] = (0, 0, 0),
    full_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Coarse map interpolated (trilinear, clamped outside) at full-resolution voxel centres.

    ``idx`` holds the global full-resolution indices along each axis (an outer grid). Coarse voxel j is centred
    on full-resolution index ``j * f + (f - 1) / 2``. Weights and corner indices are computed from the global
    index only and the axes are interpolated one after the other, so a voxel gets the same number whatever
    chunk it falls in; only the coarse sub-box the chunk needs is touched. ``coarse`` may be that sub-box alone:
    it then starts at coarse index ``offset`` of a map of shape ``full_shape``.
    """
    out = coarse
    full_shape = coarse.shape if full_shape is None else full_shape
    for ax in range(3):
        out = _lerp_axis(out, idx[ax], full_shape[ax], factors[ax], offset[ax], ax)
    return out


@dataclass
class _Lerp:
    """A coarse map ready to be interpolated voxel by voxel in the compiled kernels: :func:`_trilinear` done
    along the first two axes (``a``, full resolution there, coarse along the last axis), and the last axis's
    corners (``k0``, ``k1``, indices into ``a``) and weights (``w0 = 1 - w``, ``w1 = w``) per voxel. The value
    at ``(i, j, k)`` is ``a[i, j, k0[k]] * w0[k] + a[i, j, k1[k]] * w1[k]``: :func:`_trilinear`'s last step,
    the same operations in the same order, hence the same number."""

    a: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    def parts(self) -> tuple:
        """(a, k0, k1, w0, w1), as the kernels take it."""
        return self.a, self.k0, self.k1, self.w0, self.w1

    def crop(self, lo: Sequence[int], size: Sequence[int]) -> _Lerp:
        """The plan of the sub-box ``[lo, lo + size)`` of the voxels it was made for."""
        s = [slice(a, a + n) for a, n in zip(lo, size)]
        return _Lerp(self.a[s[0], s[1]], self.k0[s[2]], self.k1[s[2]], self.w0[s[2]], self.w1[s[2]])


def _lerp_plan(model: dict, key: str, idx: list[np.ndarray]) -> _Lerp:
    """The :class:`_Lerp` of ``model[key]`` (the chunk's sub-box of a coarse map) at the voxels ``idx``."""
    f, off, nc = model["factors"], model["offset"], model["cshape"]
    a = model[key]
    for ax in range(2):
        a = _lerp_axis(a, idx[ax], nc[ax], f[ax], off[ax], ax)
    m = idx[2].size
    if nc[2] == 1:  # a[..., 0] * 1.0 + a[..., 0] * 0.0 is a[..., 0] (np.repeat's value)
        k0 = np.zeros(m, np.intp)
        return _Lerp(np.ascontiguousarray(a), k0, k0, np.ones(m), np.zeros(m))
    i0, w = _axis_weights(idx[2], nc[2], f[2])
    lo = int(i0.min())
    a = np.ascontiguousarray(a[:, :, lo - off[2] : int(i0.max()) + 2 - off[2]])
    return _Lerp(a, i0 - lo, i0 + 1 - lo, 1.0 - w, w)


#: Edge (voxels) of the tiles in which the band's smoothing is computed (:func:`_smoothed_inner`): the band is
#: coarse-voxel-shaped (5 voxels at 0.2 mm, 10 at 0.1 mm) and each pass grows it by the kernel rounded up to tiles.
_TILE = 8


def _smoothing(spacing: np.ndarray, refine_sigma_mm: float, truncate: float, shape) -> tuple[tuple, tuple]:
    """Gaussian sigma (voxels) and the overlap depth that makes the chunked filter exact."""
    sig = tuple(float(refine_sigma_mm) / s if refine_sigma_mm > 0 else 0.0 for s in spacing)
    # scipy's Gaussian kernel radius is int(truncate * sigma + 0.5)
    # (+_SPECK_PASSES: the rule is also evaluated on a ring around the chunk, for the neighbour test)
    depth = tuple(int(truncate * s + 0.5) + _SPECK_PASSES for s in sig)
    depth = tuple(min(d, n - 1) for d, n in zip(depth, shape))
    return sig, depth


@njit(cache=True, nogil=True)
def _tile_runs_nb(tiles):  # pragma: no cover (compiled)
    """The flagged ``tiles`` as runs along the last axis: rows ``(t0, t1, first, stop)``, in C order."""
    nt0, nt1, nt2 = tiles.shape
    runs = np.empty((tiles.size, 4), np.int64)
    n = 0
    for t0 in range(nt0):
        for t1 in range(nt1):
            t2 = 0
            while t2 < nt2:
                if not tiles[t0, t1, t2]:
                    t2 += 1
                    continue
                e = t2
                while e < nt2 and tiles[t0, t1, e]:
                    e += 1
                runs[n, 0], runs[n, 1], runs[n, 2], runs[n, 3] = t0, t1, t2, e
                n += 1
                t2 = e
    return runs[:n]


@njit(cache=True, nogil=True)
def _air_weights_nb(b, mb, mo, m_air, runs, tile, bw, w):  # pragma: no cover (compiled)
    """Bright side: ``w`` = the voxel is above the local air threshold, the midpoint between air and the darker
    of brain and outside (1.0 / 0.0), ``bw = b * w``; ``b`` not finite counts as 0. ``mb``, ``mo``: the
    (a, k0, k1, w0, w1) of :class:`_Lerp` of ``m_brain`` and ``m_out``. Written at the voxels of the tiles
    (``tile``-voxel cubes of ``b``) of ``runs`` (:func:`_tile_runs_nb`) only."""
    n0, n1, n2 = b.shape
    for r in range(runs.shape[0]):
        t0, t1 = runs[r, 0], runs[r, 1]
        k0, k1 = runs[r, 2] * tile, min(runs[r, 3] * tile, n2)
        for i in range(t0 * tile, min((t0 + 1) * tile, n0)):
            for j in range(t1 * tile, min((t1 + 1) * tile, n1)):
                for k in range(k0, k1):
                    x = b[i, j, k]
                    if not np.isfinite(x):
                        x = np.float32(0.0)
                    vb = mb[0][i, j, mb[1][k]] * mb[3][k] + mb[0][i, j, mb[2][k]] * mb[4][k]
                    vo = mo[0][i, j, mo[1][k]] * mo[3][k] + mo[0][i, j, mo[2][k]] * mo[4][k]
                    lo = vb if (vb < vo or vb != vb) else vo  # np.minimum (NaN propagates)
                    one = np.float32(1.0) if x > 0.5 * (m_air + lo) else np.float32(0.0)
                    w[i, j, k] = one
                    bw[i, j, k] = x * one


@njit(cache=True, nogil=True)
def _gauss_pass_nb(x, fw, ax, lo, n_out):  # pragma: no cover (compiled)
    """scipy's ``correlate1d`` of float32 ``x`` with the symmetric kernel ``fw`` along ``ax``, at the positions
    ``[lo, lo + n_out)`` of that axis only (the kernel must fit inside ``x`` there: no boundary), float32 out.

    Each output is scipy's sum, in scipy's order and in float64: ``x[c] * fw[h]``, then ``(x[c - t] + x[c + t])
    * fw[h - t]`` added for ``t = h .. 1``, rounded to float32 once -- the same number (tested bit for bit). The
    loops run along the contiguous last axis, so they vectorise (scipy copies every line to a buffer)."""
    h = fw.size // 2
    n0, n1, n2 = x.shape
    shp = [n0, n1, n2]
    shp[ax] = n_out
    out = np.empty((shp[0], shp[1], shp[2]), np.float32)
    acc = np.empty(shp[2], np.float64)
    for a in range(shp[0]):
        for b in range(shp[1]):
            # slices, not computed indices, inside the inner loops: they vectorise only then (negative-index checks)
            if ax == 0:
                c0 = x[lo + a, b]
            elif ax == 1:
                c0 = x[a, lo + b]
            else:
                c0 = x[a, b, lo : lo + n_out]
            for k in range(shp[2]):
                acc[k] = np.float64(c0[k]) * fw[h]
            for t in range(h, 0, -1):
                if ax == 0:
                    m, p = x[lo + a - t, b], x[lo + a + t, b]
                elif ax == 1:
                    m, p = x[a, lo + b - t], x[a, lo + b + t]
                else:
                    m, p = x[a, b, lo - t : lo - t + n_out], x[a, b, lo + t : lo + t + n_out]
                wt = fw[h - t]
                for k in range(shp[2]):
                    acc[k] += (np.float64(m[k]) + np.float64(p[k])) * wt
            for k in range(shp[2]):
                out[a, b, k] = np.float32(acc[k])
    return out


@njit(cache=True, nogil=True)
def _gauss_tiles_nb(x, fw, ax, lo, hi, runs, tile, out):  # pragma: no cover (compiled)
    """:func:`_gauss_pass_nb` of ``x`` along ``ax`` written into ``out`` (both the box's shape) at the voxels of
    the tiles (``tile``-voxel cubes of the box) of ``runs`` (:func:`_tile_runs_nb`) inside ``[lo, hi)`` per
    axis; ``out`` keeps its other values. Each value is the same sum in the same order as
    :func:`_gauss_pass_nb`'s, so the same number; a run along the contiguous last axis is one loop (it
    vectorises)."""
    h = fw.size // 2
    acc = np.empty(x.shape[2], np.float64)
    for r in range(runs.shape[0]):
        t0, t1 = runs[r, 0], runs[r, 1]
        a0, a1 = max(t0 * tile, lo[0]), min((t0 + 1) * tile, hi[0])
        b0, b1 = max(t1 * tile, lo[1]), min((t1 + 1) * tile, hi[1])
        c0, c1 = max(runs[r, 2] * tile, lo[2]), min(runs[r, 3] * tile, hi[2])
        m = c1 - c0
        if m <= 0:
            continue
        for a in range(a0, a1):
            for b in range(b0, b1):
                c = x[a, b, c0:c1]
                for k in range(m):
                    acc[k] = np.float64(c[k]) * fw[h]
                for t in range(h, 0, -1):
                    if ax == 0:
                        mm, pp = x[a - t, b, c0:c1], x[a + t, b, c0:c1]
                    elif ax == 1:
                        mm, pp = x[a, b - t, c0:c1], x[a, b + t, c0:c1]
                    else:
                        mm, pp = x[a, b, c0 - t : c1 - t], x[a, b, c0 + t : c1 + t]
                    wt = fw[h - t]
                    for k in range(m):
                        acc[k] += (np.float64(mm[k]) + np.float64(pp[k])) * wt
                for k in range(m):
                    out[a, b, c0 + k] = np.float32(acc[k])


@functools.lru_cache(maxsize=16)
def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """The kernel scipy's ``gaussian_filter1d`` applies (read off its response to an impulse, exact: every output
    is one weight times 1.0 plus zeros), or an empty array if it is not symmetric (then scipy sums otherwise)."""
    r = int(truncate * sigma + 0.5) + 1
    impulse = np.zeros(2 * r + 1)
    impulse[r] = 1.0
    fw = ndi.gaussian_filter1d(impulse, sigma, mode="constant", truncate=truncate)
    nz = np.flatnonzero(fw)
    fw = np.ascontiguousarray(fw[nz[0] : nz[-1] + 1])
    return fw if fw.size % 2 == 1 and np.array_equal(fw, fw[::-1]) else np.zeros(0)


def _gaussian_cropped(x: np.ndarray, sig: tuple, truncate: float, keep: tuple) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(x, sig, mode="nearest", truncate=truncate)[keep]`` for float32 ``x``,
    bit for bit: the same 1-D passes in the same order (float32 between passes), each axis cropped to ``keep``
    right after its pass -- the later passes run along other axes, so the kept values are the same. Where the
    halo holds the whole kernel (always, but in volumes thinner than it) a pass is :func:`_gauss_pass_nb`:
    measured 3.6x less CPU than scipy's filter of a 148^3 box at 0.1 mm."""
    for ax in range(3):
        lo, hi = keep[ax].start, keep[ax].stop
        if sig[ax] <= 1e-15:  # gaussian_filter skips these axes too
            x = x[(slice(None),) * ax + (keep[ax],)]
            continue
        fw = _gaussian_weights(float(sig[ax]), float(truncate))
        h = fw.size // 2
        if fw.size and lo >= h and hi + h <= x.shape[ax]:
            x = _gauss_pass_nb(np.ascontiguousarray(x), fw, ax, lo, hi - lo)
        else:
            x = ndi.gaussian_filter1d(x, sig[ax], axis=ax, output=np.float32, mode="nearest", truncate=truncate)
            x = x[(slice(None),) * ax + (keep[ax],)]
    return x


def _band_tiles(band: np.ndarray, par: Sequence[np.ndarray], lo: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The :data:`_TILE`-voxel tiles of a box of ``shape`` that hold a voxel of the coarse ``band``: ``par[ax]``
    is the coarse parent (index into ``band``) of the voxels ``lo[ax], lo[ax] + 1, ...`` of the box's axis."""
    x = band.astype(np.int32)
    for ax, (p, a, n) in enumerate(zip(par, lo, shape)):
        cover = np.zeros((band.shape[ax], -(-int(n) // _TILE)), np.int32)
        cover[p, (a + np.arange(p.size)) // _TILE] = 1
        # contract the coarse axis in front; the tile axis goes to the back (after three: tiles in axis order)
        x = np.tensordot(x, cover, axes=(0, 0))
    return x > 0


def _dilate_tiles(tiles: np.ndarray, ax: int, n: int) -> np.ndarray:
    """``tiles`` grown by ``n`` tiles both ways along ``ax``."""
    out = tiles.copy()
    for s in range(1, n + 1):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -s), slice(s, None)
        out[tuple(lo)] |= tiles[tuple(hi)]
        out[tuple(hi)] |= tiles[tuple(lo)]
    return out


def _smoothed_inner(
    block: np.ndarray,
    model: dict,
    depth: tuple,
    keep: tuple,
    lerps: tuple,
    tiles: np.ndarray | None = None,
    scratch: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(numerator, denominator, signal weights) of the smoothed intensity on ``keep`` (slices of ``block``).

    The smoothing is a normalised convolution that ignores air voxels: fluid next to the bag wall or a bubble,
    and brain next to air, keep their own intensity instead of being blurred towards air -- otherwise bright
    fluid blurred with air passes through brain intensities. Where the fluid is not the bright side, air and a
    dark fixative lie on the same side of the tissue: a plain average (an air voxel next to the cortex must not
    take the cortex's intensity), whose denominator is a Gaussian of ones -- the same number everywhere (every
    voxel sums the same weights in the same order), so it is returned as a (1, 1, 1) array and not filtered
    (measured: 40% of the smoothing's CPU on the dark side). The weights are None there (all ones).

    ``tiles`` (:func:`_band_tiles` of the band's voxels in ``keep``): the values are needed there only, and
    are exact there; elsewhere they are undefined (never read). Each Gaussian pass is computed on the tiles the
    later passes read (the band's tiles grown by the kernel along the axes still to come), in the same
    operations.
    The band holds ~6% of a band chunk's voxels (the template phantom at 0.2 mm, median 5%), so most of the
    smoothing of a whole box was never read. ``scratch`` (a dict the caller keeps between chunks): the box-sized
    arrays are reused from it, and what is returned is a view of them, valid until the next call -- a fresh
    array per pass cost its page faults, as much as the tiles' arithmetic (measured).
    """
    sig, trunc = model["sigma_vox"], model["truncate"]
    fws = [_gaussian_weights(float(s), float(trunc)) if s > 1e-15 else None for s in sig]
    fits = all(
        fw is None or (fw.size > 0 and k.start >= fw.size // 2 and k.stop + fw.size // 2 <= n)
        for fw, k, n in zip(fws, keep, block.shape)
    )
    if tiles is None or not fits or not any(s_ > 0 for s_ in sig):
        return _smoothed_whole(block, model, keep, lerps)
    # the tiles each pass computes: the last pass the band's, an earlier one those the later passes read
    grow = [0 if fw is None else -(-(fw.size // 2) // _TILE) for fw in fws]  # kernel radius in tiles
    need = [tiles, tiles, tiles]
    for ax in (2, 1):
        need[ax - 1] = _dilate_tiles(need[ax], ax, grow[ax])
    read = _dilate_tiles(need[0], 0, grow[0])
    runs = [_tile_runs_nb(t) for t in need]
    pool = {} if scratch is None else scratch

    def buf(name: str) -> np.ndarray:
        # only the tiles a pass writes are ever read back, so a reused array needs no clearing
        a = pool.get(name)
        if a is None or a.shape != block.shape:
            a = pool[name] = np.empty_like(block)
        return a

    if model["side"] == "bright":
        bw, w = buf("bw"), buf("w")
        _air_weights_nb(
            block, lerps[0].parts(), lerps[1].parts(), float(model["m_air"]), _tile_runs_nb(read), _TILE, bw, w
        )
    else:
        bw, w = np.where(np.isfinite(block), block, np.float32(0)), None

    def smooth(x: np.ndarray, name: str) -> np.ndarray:
        lo = np.zeros(3, np.int64)
        hi = np.asarray(x.shape, np.int64)
        for ax in range(3):
            lo[ax], hi[ax] = keep[ax].start, keep[ax].stop
            if fws[ax] is None:
                continue
            out = buf(f"{name}{ax}")
            _gauss_tiles_nb(x, fws[ax], ax, lo, hi, runs[ax], _TILE, out)
            x = out
        return x[keep]

    num = smooth(bw, "num")
    if w is None:
        return num, ndi.gaussian_filter(np.ones((1, 1, 1), np.float32), sig, mode="nearest", truncate=trunc), None
    return num, smooth(w, "den"), w[keep]


def _smoothed_whole(
    block: np.ndarray, model: dict, keep: tuple, lerps: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`_smoothed_inner` on every voxel of ``keep`` (volumes thinner than the kernel, no smoothing)."""
    sig, trunc = model["sigma_vox"], model["truncate"]
    if model["side"] == "bright":
        bw, w = np.empty_like(block), np.empty_like(block)
        every = _tile_runs_nb(np.ones(tuple(-(-n // _TILE) for n in block.shape), np.bool_))
        _air_weights_nb(block, lerps[0].parts(), lerps[1].parts(), float(model["m_air"]), every, _TILE, bw, w)
    else:
        bw, w = np.where(np.isfinite(block), block, np.float32(0)), None
    if not any(s_ > 0 for s_ in sig):
        return bw[keep], np.ones((1, 1, 1), np.float32), None if w is None else w[keep]
    num = _gaussian_cropped(bw, sig, trunc, keep)
    if w is None:
        return num, ndi.gaussian_filter(np.ones((1, 1, 1), np.float32), sig, mode="nearest", truncate=trunc), None
    return num, _gaussian_cropped(w, sig, trunc, keep), w[keep]


def _chunk_model(model: CoarseModel, sig: tuple, truncate: float, box_lo: tuple, box_hi: tuple) -> dict:
    """What one chunk's rule needs of the coarse model: the sub-box of the coarse maps under the image box
    ``[box_lo, box_hi)`` (the chunk and its smoothing halo) +-1 coarse voxel for the trilinear corners, with
    its offset in the coarse grid."""
    f, nc = model.factors, model.mask.shape
    lo = [max(0, a // fi - 1) for a, fi in zip(box_lo, f)]
    hi = [min(n, (b - 1) // fi + 2) for b, fi, n in zip(box_hi, f, nc)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return {
        "factors": f,
        "shape": model.shape,
        "cshape": tuple(nc),
        "offset": tuple(lo),
        "mask": model.mask[box],
        "band": model.band[box],
        "m_brain": model.m_brain[box],
        "m_out": model.m_out[box],
        "side": model.side,
        "m_air": float(model.m_air),
        "theta": float(model.theta),
        "cap": None if model.cap is None else model.cap[box],
        "fill": None if model.fill is None else model.fill[box],
        "sigma_vox": sig,
        "truncate": float(truncate),
    }


def _band_blocks(chunks: tuple, model: CoarseModel) -> np.ndarray:
    """Which chunks need the per-voxel rule: those that meet the band, or whose coarse parents are not all
    inside / all outside the mask. The others are uniform (all brain or all background) and are not read."""
    f, nc = model.factors, model.band.shape
    rng = []
    for ax, edges in enumerate(chunk_edges(chunks)):
        rng.append(
            [
                (min(int(a) // f[ax], nc[ax] - 1), min((int(b) - 1) // f[ax], nc[ax] - 1) + 1)
                for a, b in zip(edges[:-1], edges[1:])
            ]
        )
    need = np.zeros(tuple(len(r) for r in rng), dtype=bool)
    for i, (a0, b0) in enumerate(rng[0]):
        for j, (a1, b1) in enumerate(rng[1]):
            for k, (a2, b2) in enumerate(rng[2]):
                m = model.mask[a0:b0, a1:b1, a2:b2]
                need[i, j, k] = bool(model.band[a0:b0, a1:b1, a2:b2].any() or (m.any() and not m.all()))
    return need


@njit(cache=True, nogil=True)
def _rule_nb(num, den, w, mb, mo, cap, theta, bright, cm, par, valid):  # pragma: no cover (compiled)
    """The per-voxel rule (see :func:`_refine_region`) where the band is, 1 / 0 (0 elsewhere: never used).

    ``num`` / ``den`` is the smoothed intensity (0 where ``den`` is not above 1e-6; ``den`` of shape (1, 1, 1)
    is one number for all), ``w`` the signal weights (shape (1, 1, 1): all signal); ``mb``, ``mo``, ``cap``:
    :class:`_Lerp` tuples (``cap`` with an empty ``a``: none); ``cm`` the chunk's coarse (mask, band, fill)
    and ``par`` the coarse parent per axis; ``valid`` per axis: inside the volume."""
    n0, n1, n2 = num.shape
    one_den, one_w = den.size == 1, w.size == 1
    has_cap = cap[0].size > 0
    hi_theta = max(theta, 0.5)
    rule = np.zeros((n0, n1, n2), np.uint8)
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                p = (par[0][i], par[1][j], par[2][k])
                if not cm[1][p]:
                    continue
                d = den[0, 0, 0] if one_den else den[i, j, k]
                s = np.float64(num[i, j, k]) / np.float64(d) if d > np.float32(1e-6) else 0.0
                vb = mb[0][i, j, mb[1][k]] * mb[3][k] + mb[0][i, j, mb[2][k]] * mb[4][k]
                vo = mo[0][i, j, mo[1][k]] * mo[3][k] + mo[0][i, j, mo[2][k]] * mo[4][k]
                # beyond the coarse hull only a clear majority of tissue is brain: the low threshold inside the
                # hull moves the surface out by the partial-volume rim, but in the fluid it would let noise
                # through as detached specks
                t = vo + (theta if cm[0][p] else hi_theta) * (vb - vo)
                if bright:
                    sig = True if one_w else w[i, j, k] > 0
                    ok = sig and s < t
                else:
                    ok = s > t
                    if ok and has_cap:
                        ok = s <= cap[0][i, j, cap[1][k]] * cap[3][k] + cap[0][i, j, cap[2][k]] * cap[4][k]
                rule[i, j, k] = ok
    return rule


@njit(cache=True, nogil=True)
def _speck_passes_nb(rule, cm, par, valid, passes):  # pragma: no cover (compiled)
    """The band's voxels: the rule or what the coarse hull holds without tissue (``fill``); elsewhere the coarse
    mask; beyond the volume never brain. Then ``passes`` times: a voxel the rule calls brain needs three brain
    neighbours (of six), each pass on a box one voxel smaller per side; the result is the box ``passes`` voxels
    in from ``rule``'s. Only the rule's voxels can change in a pass, so only they are revisited."""
    n0, n1, n2 = rule.shape
    brain = np.zeros((n0, n1, n2), np.uint8)
    cand = np.empty(rule.size, np.int64)
    n_cand = 0
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                if not (valid[0][i] and valid[1][j] and valid[2][k]):
                    continue
                p = (par[0][i], par[1][j], par[2][k])
                if not cm[1][p]:
                    brain[i, j, k] = cm[0][p]
                elif cm[2][p]:
                    brain[i, j, k] = 1
                elif rule[i, j, k]:
                    brain[i, j, k] = 1
                    cand[n_cand] = (i * n1 + j) * n2 + k
                    n_cand += 1
    for c in range(1, passes + 1):
        # (values outside the pass's box go stale: the next pass reads only one voxel further in)
        new = brain.copy()
        for q in range(n_cand):
            i, rem = divmod(cand[q], n1 * n2)
            j, k = divmod(rem, n2)
            if c <= i < n0 - c and c <= j < n1 - c and c <= k < n2 - c:
                nb = (
                    brain[i - 1, j, k]
                    + brain[i + 1, j, k]
                    + brain[i, j - 1, k]
                    + brain[i, j + 1, k]
                    + brain[i, j, k - 1]
                    + brain[i, j, k + 1]
                )
                new[i, j, k] = nb >= 3
        brain = new
    return np.ascontiguousarray(brain[passes : n0 - passes, passes : n1 - passes, passes : n2 - passes])


def _refine_region(
    regions: list, ranges: tuple, box_lo: tuple, box_hi: tuple, depth: tuple, model: dict, scratch: dict | None = None
) -> np.ndarray:
    """One output chunk of the mask from the image box around it (the chunk plus ``depth``, clipped to the
    volume): the clipped part of the halo is the edge voxel repeated (scipy's mode ``"nearest"``).

    The per-voxel rule in the band: at least ``theta`` of the voxel is tissue -- on the tissue side of
    ``m_out + theta (m_brain - m_out)`` between the local tissue intensity at the surface and the local intensity
    of what surrounds it (fluid, or the background when the fixative gives no signal), on the air-excluding
    smoothed intensity (:func:`_smoothed_inner`). Where the fluid is brighter than tissue, air (below the local
    air threshold) is never brain; where the tissue is the brighter class, a partial-volume voxel can be below
    it, and voxels brighter than the local tissue cap (the bag wall) are not brain. Then a voxel the rule calls
    brain needs three brain neighbours (of six), twice over, so that specks of noise in the fluid and bits of a
    bag wall pressed on the brain are dropped (measured: 61-113 detached specks on the geometric phantom at 1 mm
    without this test); what the coarse hull holds without tissue (closed sulci, opened ventricles) stays brain.

    The rule and the neighbour passes are compiled loops (:func:`_rule_nb`, :func:`_speck_passes_nb`) that
    interpolate the coarse maps voxel by voxel with :func:`_trilinear`'s operations (:class:`_Lerp`): the NumPy
    version spent 60% of its CPU on full-size interpolated maps and temporaries (0.2 mm chunks, measured).
    """
    f, off, nc, shape = model["factors"], model["offset"], model["cshape"], model["shape"]
    par = [np.minimum(np.arange(a, b) // fi, n - 1) - o for (a, b), fi, n, o in zip(ranges, f, nc, off)]
    if not model["band"][tuple(slice(p[0], p[-1] + 1) for p in par)].any():
        return model["mask"][np.ix_(*par)].astype(np.uint8)
    block = np.ascontiguousarray(pad_halo(regions[0], ranges, box_lo, box_hi, depth, "edge"), dtype=np.float32)
    # the rule on the chunk and a ring of _SPECK_PASSES voxels around it (the halo holds that much more than the
    # smoothing needs, so the ring's values are exact too)
    r = _SPECK_PASSES
    ring = [np.arange(a - r, b + r) for a, b in ranges]
    keep = tuple(slice(d - r, d - r + p.size) for d, p in zip(depth, ring))
    # the coarse maps at the block's voxels (their global indices, clamped like the 'nearest' padding)
    idx_pad = [np.clip(np.arange(a - d, b + d), 0, n - 1) for (a, b), d, n in zip(ranges, depth, shape)]
    lerps = tuple(
        None if model.get(key) is None else _lerp_plan(model, key, idx_pad) for key in ("m_brain", "m_out", "cap")
    )
    par_e = tuple(np.minimum(np.clip(p, 0, n - 1) // fi, m - 1) - o for p, n, fi, m, o in zip(ring, shape, f, nc, off))
    ring_lo, ring_n = [s.start for s in keep], [p.size for p in ring]
    tiles = _band_tiles(model["band"], par_e, ring_lo, block.shape)
    num, den, w = _smoothed_inner(block, model, depth, keep, lerps, tiles, scratch)
    lerp_e = [None if lp is None else lp.crop(ring_lo, ring_n).parts() for lp in lerps]
    mb, mo = lerp_e[0], lerp_e[1]
    assert mb is not None and mo is not None  # the model always has both maps
    no_cap = (np.zeros((0, 0, 0)),) + mb[1:]
    fill = model["fill"] if model.get("fill") is not None else np.zeros_like(model["mask"])
    cm = (model["mask"], model["band"], fill)
    valid = tuple((p >= 0) & (p < n) for p, n in zip(ring, shape))
    rule = _rule_nb(
        num,
        den,
        np.ones((1, 1, 1), np.float32) if w is None else w,
        mb,
        mo,
        no_cap if lerp_e[2] is None else lerp_e[2],
        float(model["theta"]),
        model["side"] == "bright",
        cm,
        par_e,
        valid,
    )
    return _speck_passes_nb(rule, cm, par_e, valid, r)


#: Band chunks per refine task of a stored scan (at most), taken consecutively along a Hilbert curve of the chunk
#: grid, and the decoded stored chunks a task keeps whole for a later box (48 float32 128^3 chunks = 384 MB, less
#: than the chunk cache's 512 MB that one task per chunk filled; halo slivers are kept apart, see _refine_batch).
#: One task per chunk decoded ~27 stored chunks per band chunk (no cache hits on 2 workers at 0.1 mm: ~13x the
#: scan's bytes with the coarse pass); measured on the 0.2 mm phantom (109 band chunks, 192 stored), synchronous:
#: batches of 16 decode 529 stored chunks, of 32 391, of 64 292.
_BATCH = 32
_MEMO_CHUNKS = 48

#: Output chunks per computation when the pipeline writes the mask of a stored scan
#: (``save_volume(batch_chunks=...)``, and ``brain_mask(batch_chunks=...)`` for the refine tasks' grouping). The
#: writer's default (64) made 28 computations at 0.1 mm, each ending on one or two ~1 s refine tasks with a worker
#: idle: refine + write 46.4 s with the workers busy 68% of it; in one computation 33.6 s. No task of this graph
#: is shared between chunks (a refine task reads the store itself), so a bigger box holds no more than its
#: running tasks' results (<= 64 MB each). The refine tasks are grouped in the same boxes (:func:`_band_groups`):
#: grouped in boxes of 64 under a writer of 512, 53 tasks instead of 18 read 66.8 GB instead of 53.1 GB (the
#: processes' logical reads), and the stage alone took 68.6 s instead of 61.3 s on the 0.1 mm template phantom
#: (2 workers).
MASK_BATCH_CHUNKS = 512


def _hilbert_key(cell: Sequence[int], bits: int) -> int:
    """Position of a 3-D cell on the Hilbert curve of a ``2**bits`` cube (Skilling's transpose)."""
    x = [int(c) for c in cell]
    q = 1 << (bits - 1)
    while q > 1:
        p = q - 1
        for i in range(3):
            if x[i] & q:
                x[0] ^= p
            else:
                t = (x[0] ^ x[i]) & p
                x[0] ^= t
                x[i] ^= t
        q >>= 1
    for i in range(1, 3):
        x[i] ^= x[i - 1]
    t, q = 0, 1 << (bits - 1)
    while q > 1:
        if x[2] & q:
            t ^= q - 1
        q >>= 1
    key = 0
    for b in range(bits - 1, -1, -1):
        for i in range(3):
            key = (key << 1) | (((x[i] ^ t) >> b) & 1)
    return key


def _stored_edges(view: StoreView) -> list[np.ndarray]:
    """The stored chunks' edges along each axis of ``view`` (a flipped axis has them counted from its end)."""
    edges = []
    for a in view.perm:
        n, c = int(view.array.shape[a]), int(view.array.chunks[a])
        e = np.arange(0, n + c, c).clip(max=n)
        edges.append(np.unique(n - e) if view.flips[a] else np.unique(e))
    return edges


def _refine_batch(view: StoreView, items: list) -> tuple:
    """:func:`_refine_region` of several chunks (``(ranges, lo, hi, depth, model)`` each) of a stored scan, their
    boxes pasted from stored chunks decoded once: when a stored chunk is decoded, the slivers of it that later
    boxes of the batch need as their halo are copied aside (a few % of a chunk each), and the whole chunk is kept
    while a later box needs most of it (at most :data:`_MEMO_CHUNKS`; the one needed furthest ahead goes first)."""
    edges = _stored_edges(view)
    boxes = [(lo, hi) for _, lo, hi, _, _ in items]
    cells = [list(product(*_overlap(edges, lo, hi))) for lo, hi in boxes]
    users: dict = {}  # stored chunk -> the boxes (indices) that need part of it, in order
    for t, cs in enumerate(cells):
        for c in cs:
            users.setdefault(c, []).append(t)
    whole: dict = {}  # stored chunk -> decoded, for a later box that needs more than half of it
    pieces: dict = {}  # (stored chunk, box) -> the part of it that box needs
    out = []
    scratch: dict = {}  # the refinement's box-sized arrays, reused from chunk to chunk
    for t, (ranges, lo, hi, depth, model) in enumerate(items):
        box = np.empty(tuple(b - a for a, b in zip(lo, hi)), np.dtype(view.dtype))
        for c in cells[t]:
            c_lo = [int(e[i]) for e, i in zip(edges, c)]
            c_hi = [int(e[i + 1]) for e, i in zip(edges, c)]
            dst = tuple(slice(max(a, l) - l, min(b, h) - l) for a, b, l, h in zip(c_lo, c_hi, lo, hi))
            if (c, t) in pieces:
                box[dst] = pieces.pop((c, t))
                continue
            arr = whole.get(c)
            if arr is None:
                arr = view.read(c_lo, c_hi)
                for u in users[c]:
                    src = tuple(slice(max(a, l) - a, min(b, h) - a) for a, b, (l, h) in zip(c_lo, c_hi, zip(*boxes[u])))
                    if u > t and (c, u) not in pieces and 2 * arr[src].size <= arr.size:
                        pieces[(c, u)] = arr[src].copy()
                whole[c] = arr
            box[dst] = arr[tuple(slice(d.start + l - a, d.stop + l - a) for d, a, l in zip(dst, c_lo, lo))]
        whole = _keep_whole(whole, users, pieces, t)
        out.append(_refine_region([box], ranges, lo, hi, depth, model, scratch))
    return tuple(out)


def _keep_whole(whole: dict, users: dict, pieces: dict, t: int) -> dict:
    """The decoded stored chunks still needed whole after box ``t`` (a later box needs a part not set aside),
    at most :data:`_MEMO_CHUNKS`: those needed soonest."""
    ahead = {c: min((u for u in users[c] if u > t and (c, u) not in pieces), default=-1) for c in whole}
    keep = sorted((u, c) for c, u in ahead.items() if u >= 0)[:_MEMO_CHUNKS]
    return {c: whole[c] for _, c in keep}


def _overlap(edges: list[np.ndarray], lo: Sequence[int], hi: Sequence[int]) -> list[range]:
    """Per axis, the stored chunks (``edges``) that overlap ``[lo, hi)``."""
    return [
        range(int(np.searchsorted(e, a, side="right")) - 1, int(np.searchsorted(e, b, side="left")))
        for e, a, b in zip(edges, lo, hi)
    ]


def _constant_chunk(shape: tuple, value: int) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def _band_groups(chunks: tuple, band: list, batch_chunks: int = STORE_BATCH_CHUNKS) -> list[list]:
    """The band chunks in refine tasks: within each box of the writer's batches (:func:`block_batches` of
    ``batch_chunks``), along a Hilbert curve of the chunk grid, at most :data:`_BATCH` per task and at least two
    tasks per box (both workers busy in every batch).

    Why the writer's boxes: a task whose chunks lie in two batches ran once per batch (the writer computes its
    batches one after the other, nothing is kept between them). With tasks along one Hilbert curve of the
    whole volume, the 0.2 mm phantom's 109 band chunks were refined 187 times, in 7 task runs instead of 4;
    at 0.1 mm the stage decoded 7x the scan's bytes."""
    numblocks = tuple(len(c) for c in chunks)
    bits = max(1, max(numblocks).bit_length())
    groups = []
    for box in block_batches(numblocks, batch_chunks):
        inside = [idx for idx in band if all(s.start <= i < s.stop for i, s in zip(idx, box))]
        if not inside:
            continue
        inside.sort(key=lambda idx: _hilbert_key(idx, bits))
        n_tasks = max(min(2, len(inside)), -(-len(inside) // _BATCH))
        size = -(-len(inside) // n_tasks)
        groups += [inside[b : b + size] for b in range(0, len(inside), size)]
    return groups


def _batched_refine(view: StoreView, chunks: tuple, plans: dict, token: str, batch_chunks: int) -> da.Array:
    """The mask as one task per group of band chunks (:func:`_band_groups`) reading a stored scan through
    :func:`_refine_batch`, and one getter per band chunk; the other chunks constant."""
    name = f"brain-mask-{token}"
    band = [idx for idx, p in plans.items() if isinstance(p, tuple)]
    layer: dict = {}
    for g, group in enumerate(_band_groups(chunks, band, batch_chunks)):
        key = (f"{name}-batch", g)
        layer[key] = (functools.partial(_refine_batch, view, [plans[i][2] for i in group]),)
        for j, idx in enumerate(group):
            layer[(name,) + idx] = (operator.getitem, key, j)
    for idx, p in plans.items():
        if not isinstance(p, tuple):
            shape = tuple(c[i] for c, i in zip(chunks, idx))
            layer[(name,) + idx] = (functools.partial(_constant_chunk, shape, 0 if p is None else int(p)),)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[])
    return da.Array(graph, name, chunks=chunks, dtype=np.uint8)


def refine_mask(
    image: xr.DataArray,
    model: CoarseModel,
    *,
    refine_sigma_mm: float = 0.25,
    truncate: float = 3.0,
    batch_chunks: int = STORE_BATCH_CHUNKS,
) -> da.Array:
    """Lazy full-resolution mask (uint8 dask array) from a :class:`CoarseModel`; chunked like ``image``.

    A chunk that meets the boundary band reads the image box it needs (the chunk and the smoothing halo) and
    carries only its sub-box of the coarse maps; the other chunks are constant and read nothing. An image in
    memory or computed: one task per chunk (:func:`helm_dask.io.regions.region_map`). A stored image: one task
    per batch of band chunks along a Hilbert curve of the chunk grid (:func:`_refine_batch`), which decodes
    each stored chunk the batch needs once, so that neighbouring halos do not decode it again.

    Parameters
    ----------
    image : DataArray
        The scan the model was fitted on.
    model : CoarseModel
        From :func:`fit_coarse_model`.
    refine_sigma_mm : float
        Gaussian smoothing (mm) of the intensity before the per-voxel rule (0 = none).
    truncate : float
        Kernel radius of that smoothing, in sigmas.
    batch_chunks : int
        The ``batch_chunks`` the mask will be written with (``save_volume``'s): a stored scan's refine tasks are
        grouped within its boxes, so that each runs once. The values do not depend on it.

    Returns
    -------
    dask.array.Array
        uint8 0/1, the shape and chunks of ``image``.

    Examples
    --------
    >>> model = fit_coarse_model(scan)                            # doctest: +SKIP
    >>> mask = refine_mask(scan, model).compute()                 # doctest: +SKIP
    """
    arr = as_dask(image)
    spacing = spacing_of(affine_of(image))
    sig, depth = _smoothing(spacing, refine_sigma_mm, truncate, arr.shape)
    need = _band_blocks(arr.chunks, model)
    shape = tuple(int(n) for n in arr.shape)
    mshape = model.mask.shape

    def plan(index, ranges):
        if not need[index]:
            # no band voxel and wholly inside or outside the coarse mask: the image is not even read
            par = tuple(min(a // fi, n - 1) for (a, _), fi, n in zip(ranges, model.factors, mshape))
            return 1 if bool(model.mask[par]) else None
        lo, hi = halo_box(ranges, depth, shape)
        return lo, hi, (ranges, lo, hi, depth, _chunk_model(model, sig, truncate, lo, hi))

    view = store_view_of(arr)
    if view is None:
        return region_map(_refine_region, [arr], arr.chunks, plan, np.uint8, name="brain-mask")
    # a stored scan: band chunks in batches that decode each stored chunk about once (see _BATCH)
    bounds = chunk_edges(arr.chunks)
    plans = {index: plan(index, tuple(zip(lo, hi))) for index, lo, hi in box_cells(bounds)}
    fields = (model.mask, model.band, model.m_brain, model.m_out, model.cap, model.fill, model.side, model.m_air)
    token = tokenize(
        arr.name, arr.chunks, fields, model.theta, model.factors, sig, depth, truncate, _BATCH, batch_chunks
    )
    return _batched_refine(view, arr.chunks, plans, token, batch_chunks)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def _recorded_params(settings: dict[str, Any], model: CoarseModel, refine_sigma_mm: float) -> dict[str, Any]:
    """The stage's parameters as the provenance records them (numbers as floats, the band widths used)."""
    return {
        "coarse_spacing_mm": float(settings["coarse_spacing_mm"]),
        "fluid": settings["fluid"],
        "fluid_tolerance": float(settings["fluid_tolerance"]),
        "bias_basis_spacing_mm": float(settings["bias_basis_spacing_mm"]),
        "opening_radius_mm": float(settings["opening_radius_mm"]),
        "closing_radius_mm": float(settings["closing_radius_mm"]),
        "min_tissue_fraction": float(settings["min_tissue_fraction"]),
        "band_mm": model.info["band_mm"],
        "band_out_mm": model.info["band_out_mm"],
        "refine_sigma_mm": float(refine_sigma_mm),
        "local_sigma_mm": float(settings["local_sigma_mm"]),
        "max_fov_fraction": float(settings["max_fov_fraction"]),
        "min_brain_fraction": float(settings["min_brain_fraction"]),
    }


def brain_mask(
    image: xr.DataArray,
    *,
    coarse_spacing_mm: float = 1.0,
    fluid: str = "auto",
    fluid_tolerance: float = 0.12,
    bias_basis_spacing_mm: float = 50.0,
    opening_radius_mm: float = 2.0,
    closing_radius_mm: float = 5.0,
    min_tissue_fraction: float = 0.2,
    band_mm: float | None = None,
    band_out_mm: float | None = None,
    refine_sigma_mm: float = 0.25,
    local_sigma_mm: float = 2.0,
    max_fov_fraction: float = 0.9,
    min_brain_fraction: float = 0.05,
    batch_chunks: int = STORE_BATCH_CHUNKS,
) -> xr.DataArray:
    """Unsupervised brain mask of a bagged ex vivo scan (lazy uint8 volume, kind ``"mask"``).

    Parameters
    ----------
    image : DataArray
        3-D image volume (any affine; the work is done in voxel space with mm from the affine).
    coarse_spacing_mm : float
        Target voxel size of the coarse copy (integer block factor per axis).
    fluid : {"auto", "bright", "dark", "none"}
        What fills the bag: ``auto`` decides from the data; ``bright`` / ``dark``: a fixative brighter / darker
        than tissue; ``none``: a fixative without signal (e.g. Fomblin), the brain is then all the signal.
    fluid_tolerance : float
        Coarse voxels within this log-ratio of the (bias-following) fluid intensity count as fluid (0.12 = 12%).
    bias_basis_spacing_mm : float
        Shortest wavelength of the smooth field fitted to the fluid (DCT basis, as in :mod:`helm_dask.bias`).
    opening_radius_mm, closing_radius_mm : float
        Coarse-grid morphology (ball radii in mm): the opening cuts thin partial-volume bridges along the bag
        wall and around bubbles; the closing fills sulci and their fixative (0 = none).
    min_tissue_fraction : float
        A voxel is brain when at least this fraction of it is tissue by the partial-volume mix of the two levels.
    band_mm, band_out_mm : float, optional
        Coarse voxels within these distances inside / outside the coarse boundary are refined at full
        resolution (defaults 1.5 and 1.0 x the coarse spacing).
    refine_sigma_mm : float
        Gaussian smoothing (mm) of the full-resolution intensity before the per-voxel rule (0 = none); air voxels
        are left out of the average (normalised convolution).
    local_sigma_mm : float
        Smoothness (mm) of the local brain/fluid intensity maps.
    max_fov_fraction : float
        A mask covering more than this fraction of the field of view (or touching all six faces) means the bag
        was not removed: error.
    min_brain_fraction : float
        The brain must hold at least this fraction of the signal voxels: otherwise "no brain found".
    batch_chunks : int
        The ``batch_chunks`` the mask is written with (:func:`refine_mask`; the pipeline's: :data:`MASK_BATCH_CHUNKS`).

    Returns
    -------
    DataArray
        uint8 0/1 mask, lazy, same grid and chunks as ``image``; ``attrs["background"]`` holds the fitted
        parameters (JSON-able). Computed eagerly: the coarse copy (one pass over the image) and the coarse
        model; the full-resolution refinement is lazy and reads only the chunks that meet the boundary band.

    Raises
    ------
    HelmError
        Empty/constant image, no fluid or no brain found, or a mask that covers the field of view.

    Examples
    --------
    A brain in a bag of bright fluid, with air around the bag:

    >>> import dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> x, y, z = np.mgrid[:48, :48, :48] - 23.5
    >>> r = np.sqrt(x**2 + y**2 + z**2)
    >>> img = np.where(r < 10, 100.0, np.where(r < 20, 250.0, 2.0))
    >>> img = np.abs(img + np.random.default_rng(0).normal(0, 3, r.shape)).astype("f4")
    >>> mask = brain_mask(make_volume(da.from_array(img, chunks=16), np.eye(4)), coarse_spacing_mm=2.0)
    >>> int(mask.sum()) == int((r < 10).sum()), mask.attrs["background"]["fluid_side"]
    (True, 'bright')
    """
    settings: dict[str, Any] = {
        "coarse_spacing_mm": coarse_spacing_mm,
        "fluid": fluid,
        "fluid_tolerance": fluid_tolerance,
        "bias_basis_spacing_mm": bias_basis_spacing_mm,
        "opening_radius_mm": opening_radius_mm,
        "closing_radius_mm": closing_radius_mm,
        "min_tissue_fraction": min_tissue_fraction,
        "band_mm": band_mm,
        "band_out_mm": band_out_mm,
        "local_sigma_mm": local_sigma_mm,
        "max_fov_fraction": max_fov_fraction,
        "min_brain_fraction": min_brain_fraction,
    }
    model = fit_coarse_model(image, **settings)
    data = refine_mask(image, model, refine_sigma_mm=refine_sigma_mm, batch_chunks=batch_chunks)
    params = _recorded_params(settings, model, refine_sigma_mm)
    out = like(image, data, kind="mask", name="brain_mask", step=provenance_record("background", params))
    out.attrs["background"] = dict(model.info, refine_sigma_mm=float(refine_sigma_mm))
    return out


def apply_mask(image: xr.DataArray, mask: xr.DataArray) -> xr.DataArray:
    """The image with everything outside the mask set to 0 (lazy; same dtype and grid as ``image``).

    Parameters
    ----------
    image : DataArray
        3-D image volume.
    mask : DataArray
        0/1 mask on the same grid (shape and affine).

    Returns
    -------
    DataArray
        Same dtype, grid and chunks as ``image``.

    Raises
    ------
    HelmError
        A mask that is not on the image grid.

    Examples
    --------
    >>> from helm_dask.volume import make_volume
    >>> img = make_volume(np.full((2, 2, 2), 5.0), np.eye(4))
    >>> m = make_volume(np.eye(2, dtype="u1")[:, :, None].repeat(2, axis=2), np.eye(4), kind="mask")
    >>> apply_mask(img, m).values[:, :, 0].tolist()
    [[5.0, 0.0], [0.0, 5.0]]
    """
    check_3d(image, "image")
    check_3d(mask, "mask")
    if tuple(image.shape) != tuple(mask.shape) or not np.allclose(affine_of(image), affine_of(mask), rtol=0, atol=1e-6):
        raise HelmError(
            f"mask grid {tuple(mask.shape)} does not match the image grid {tuple(image.shape)} "
            "(shape and affine must agree)",
            path=image.attrs.get("source") or None,
            hint="Compute the mask on this image, or resample it to the image grid first.",
        )
    arr = as_dask(image)
    m = as_dask(mask)
    if m.chunks != arr.chunks:
        m = m.rechunk(arr.chunks)
    data = da.where(m > 0, arr, arr.dtype.type(0))
    return like(image, data, step=provenance_record("apply_mask", {}))
