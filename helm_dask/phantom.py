"""The built-in geometric phantom, a lazy, deterministic ex vivo hemisphere in a bag at any resolution (0.1 mm
included), standing in for a real scan with its ground truths: :func:`phantom` gives the scan, the hypothalamus
labels, the brain mask, the tissue classes and the bias field as lazy volumes, each voxel computed from its
global index only (bit-identical for any chunking), and :func:`phantom_geometry` the true grid and world
geometry; the anatomy, contrast, noise and acquisition are described in ``docs/method/phantom.md``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import dask.array as da
import numpy as np

from .errors import HelmError
from .labels import FORNIX, SIDE_CODES
from .volume import make_volume, orientation_code, provenance_record

__all__ = [
    "ECHO_TIMES_MS",
    "FORNIX_LABEL",
    "FOV_MM",
    "HYPOTHALAMUS_CODES",
    "NOISE_SIGMA",
    "PHANTOM_MODEL_VERSION",
    "TISSUE_CSF",
    "TISSUE_DEEP_GM",
    "TISSUE_GM",
    "TISSUE_HYPOTHALAMUS",
    "TISSUE_NAMES",
    "TISSUE_OUTSIDE",
    "TISSUE_WM",
    "phantom",
    "phantom_geometry",
]

#: Version of the phantom model (geometry, intensities, noise); bumped whenever a voxel value would change.
PHANTOM_MODEL_VERSION = 1

#: ``truth_tissue`` class: outside the brain (fluid, bag, bubbles, air).
TISSUE_OUTSIDE = 0
#: ``truth_tissue`` class: cerebrospinal fluid (the lateral ventricle).
TISSUE_CSF = 1
#: ``truth_tissue`` class: cortical grey matter.
TISSUE_GM = 2
#: ``truth_tissue`` class: white matter (the fornix included: it is a fibre bundle).
TISSUE_WM = 3
#: ``truth_tissue`` class: deep grey matter (thalamus, striatum).
TISSUE_DEEP_GM = 4
#: ``truth_tissue`` class: hypothalamus (its five subregions).
TISSUE_HYPOTHALAMUS = 5
#: Names of the ``truth_tissue`` classes.
TISSUE_NAMES = {
    TISSUE_OUTSIDE: "outside",
    TISSUE_CSF: "csf",
    TISSUE_GM: "cortical grey matter",
    TISSUE_WM: "white matter",
    TISSUE_DEEP_GM: "deep grey matter",
    TISSUE_HYPOTHALAMUS: "hypothalamus",
}

#: Hypothalamic subunit codes by side, in the order anterior-inferior, anterior-superior, posterior,
#: tuberal-inferior, tuberal-superior (FreeSurfer numbering).
HYPOTHALAMUS_CODES = SIDE_CODES
#: Label of the fornix in the ``hypothalamus`` output.
FORNIX_LABEL = FORNIX

#: Echo times of the 7 T multi-echo FLASH the phantom imitates (ms).
ECHO_TIMES_MS = (5.65, 11.95, 18.25, 24.55)
#: Standard deviation of each Gaussian noise component (same units as the intensities; white matter is 38).
NOISE_SIGMA = 2.0
#: Field of view along voxel axes 0, 1, 2 (mm): anterior-posterior, left-right, superior-inferior.
FOV_MM = (192.0, 82.0, 130.0)

# ------------------------------------------------------------------------------------------------------------
# compartments: the one internal label every output is derived from (by lookup tables)
# ------------------------------------------------------------------------------------------------------------
_AIR, _PLASTIC, _FLUID, _BUBBLE, _CSF, _GM, _WM, _DEEP = 0, 1, 2, 3, 4, 5, 6, 7
_HYP = (8, 9, 10, 11, 12)  # anterior-inferior, anterior-superior, posterior, tuberal-inferior, -superior
_FORNIX = 13
_NCOMP = 14

_TISSUE_LUT = np.array(
    [0, 0, 0, 0, TISSUE_CSF, TISSUE_GM, TISSUE_WM, TISSUE_DEEP_GM] + [TISSUE_HYPOTHALAMUS] * 5 + [TISSUE_WM],
    dtype=np.uint8,
)
_MASK_LUT = (np.arange(_NCOMP) >= _CSF).astype(np.uint8)
# Signal at the first echo (TE 5.65 ms) before bias and noise: a FLASH-like ex vivo contrast -- bright fixative
# fluid, CSF close to it, grey > deep grey > white matter, air and plastic dark.
_SIGNAL_TE1 = np.array([0.0, 3.0, 80.0, 0.0, 76.0, 60.0, 38.0, 49.0] + [54.0] * 5 + [36.0])
# T2* (ms) of fixed tissue and fluid; air has no signal, so its value does not matter.
_T2STAR_MS = np.array([1e9, 5.0, 90.0, 1e9, 80.0, 32.0, 26.0, 22.0] + [30.0] * 5 + [24.0])


def _hyp_lut(side: str) -> np.ndarray:
    lut = np.zeros(_NCOMP, dtype=np.uint16)
    lut[list(_HYP)] = HYPOTHALAMUS_CODES[side]
    lut[_FORNIX] = FORNIX_LABEL
    return lut


def _signal_lut(echo: int) -> np.ndarray:
    """Noise-free, bias-free signal of each compartment at echo ``echo`` (float32)."""
    dte = ECHO_TIMES_MS[echo] - ECHO_TIMES_MS[0]
    return (_SIGNAL_TE1 * np.exp(-dte / _T2STAR_MS)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# geometry (object frame, mm; the canonical LEFT hemisphere -- a right one is evaluated at X -> -X)
# ------------------------------------------------------------------------------------------------------------
# Hemisphere: half-ellipsoid X <= 0 with these semi-axes, the Z centre bending with Y, narrower at the top,
# and a gentle ripple of the surface (cortex and white matter move together).
_HEMI_AX, _HEMI_AY, _HEMI_AZ = 74.0, 84.0, 57.0
_CORTEX_MM = 2.8
_RIPPLE = 0.03
# Medial window (Y, Z ellipse on the medial face) where the hemisection exposes white and deep grey matter.
_WINDOW = (-6.0, -4.0, 42.0, 24.0)
# Deep grey nuclei (centre X, Y, Z; semi-axes): thalamus (reaching the medial face) and striatum.
_NUCLEI = (((-8.0, -9.0, 0.0), (9.0, 15.0, 9.0)), ((-22.0, 8.0, 2.0), (6.0, 16.0, 10.0)))
# Lateral ventricle: X centre, Y centre, semi-axes; Z centre = top - bend * ((Y - yc) / ay)^2 (an arch).
_VENT = dict(xc=-12.0, yc=-6.0, ax=4.5, ay=30.0, az=4.0, ztop=16.0, bend=5.0)
# Hypothalamus: ellipsoid (centre, semi-axes) cut by the medial plane; subregion boundaries (relative Y, Z).
_HYPO_C = (-3.0, 4.0, -14.0)
_HYPO_R = (5.0, 7.0, 5.5)
_HYPO_ANTERIOR_Y = 2.5  # Y - Yc above this: anterior
_HYPO_POSTERIOR_Y = -2.0  # Y - Yc below this: posterior
_HYPO_SPLIT_Z = 0.0  # Z - Zc below this: inferior (anterior and tuberal parts)
# Fornix: a tube of this radius around a circular arc in the plane X = xf (centre Y0, Z0, radius R) from
# angle a0 (posterior-inferior end, in the mammillary region) to a1 (above the thalamus), degrees.
_FORNIX_ARC = dict(xf=-4.5, y0=-8.0, z0=-2.0, R=16.0, r=1.3, a0=-62.0, a1=80.0)
# Bag: rounded box (exponent 20 across, 6 in the Y-Z outline) of fluid, in a 0.6 mm plastic shell.
_BAG_C = (-36.5, 0.0, 0.0)
_BAG_R = (40.0, 91.0, 63.5)
_BAG_P = (20, 6, 6)
_BAG_WALL_MM = 0.6
# Air bubbles in the fluid (centre X, Y, Z, radius), clear of brain and bag (checked by the tests).
_BUBBLES = (
    (-62.0, 66.0, 44.0, 3.5),
    (-12.0, -72.0, 46.0, 2.5),
    (-66.0, -60.0, -46.0, 3.0),
    (-30.0, 80.0, -40.0, 2.0),
    (-70.0, 20.0, 54.0, 1.5),
    (-8.0, 74.0, 40.0, 2.0),
)
# FOV centre in the object frame of the LEFT hemisphere (the bag centre).
_FOV_C = _BAG_C
# Object -> world (RAS+ mm) for the left hemisphere: rotations about x, y, z (degrees), then a translation.
_WORLD_ROT_DEG = (4.0, -3.0, 6.0)
_WORLD_SHIFT_MM = (1.2, -6.0, 10.0)


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _object_to_world_left() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(_WORLD_ROT_DEG)
    m[:3, 3] = _WORLD_SHIFT_MM
    return m


_MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])


def _check(spacing_mm: Any, side: Any) -> tuple[float, str]:
    try:
        s = float(spacing_mm)
    except (TypeError, ValueError):
        raise HelmError(
            f"spacing_mm must be a number of millimetres, got {spacing_mm!r}",
            hint="e.g. 0.5, or 0.1 for the native resolution",
        ) from None
    if not math.isfinite(s) or s <= 0:
        raise HelmError(
            f"spacing_mm must be a positive number of millimetres, got {spacing_mm!r}",
            hint="e.g. 0.5, or 0.1 for the native resolution",
        )
    if s > 20.0:
        raise HelmError(
            f"spacing_mm={s:g} is too coarse: the phantom would have fewer than 4 voxels on an axis",
            hint="use a spacing of at most 20 mm (1-2 mm for a quick look)",
        )
    if s < 0.02:
        raise HelmError(
            f"spacing_mm={s:g} is too fine: the phantom would have more than 2.5e11 voxels",
            hint="use 0.1 mm for the native resolution, or a coarser spacing",
        )
    sd = str(side).strip().upper() if isinstance(side, str) else side
    sd = {"LEFT": "L", "RIGHT": "R"}.get(sd, sd)
    if sd not in ("L", "R"):
        raise HelmError(f"side must be 'L' or 'R', got {side!r}", hint="pass side='L' (left) or side='R' (right)")
    return s, sd


def _shape(s: float) -> tuple[int, int, int]:
    n0, n1, n2 = (max(1, int(round(f / s))) for f in FOV_MM)
    return n0, n1, n2


def _axes_full(s: float, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object-frame coordinates (canonical left hemisphere) of every voxel centre along each voxel axis.

    Axis 0 -> Y (decreasing: anterior to posterior), axis 1 -> X (decreasing: right to left), axis 2 -> Z
    (decreasing: superior to inferior). A right hemisphere is the left one flipped along axis 1, so its X
    array is the left one reversed (exactly, so that the two are exact mirror images).
    """
    n0, n1, n2 = _shape(s)
    y = _FOV_C[1] + s * ((n0 - 1) / 2.0 - np.arange(n0))
    x = _FOV_C[0] + s * ((n1 - 1) / 2.0 - np.arange(n1))
    z = _FOV_C[2] + s * ((n2 - 1) / 2.0 - np.arange(n2))
    if side == "R":
        x = x[::-1].copy()
    return y, x, z


def _affine(s: float, side: str) -> np.ndarray:
    n0, n1, n2 = _shape(s)
    vox_to_obj = np.zeros((4, 4))
    vox_to_obj[1, 0] = -s
    vox_to_obj[0, 1] = -s
    vox_to_obj[2, 2] = -s
    vox_to_obj[:3, 3] = (_FOV_C[0] + s * (n1 - 1) / 2.0, _FOV_C[1] + s * (n0 - 1) / 2.0, _FOV_C[2] + s * (n2 - 1) / 2.0)
    vox_to_obj[3, 3] = 1.0
    aff = _object_to_world_left() @ vox_to_obj
    if side == "R":
        flip_j = np.eye(4)
        flip_j[1, 1] = -1.0
        flip_j[1, 3] = n1 - 1
        aff = _MIRROR @ aff @ flip_j
    return aff


# ------------------------------------------------------------------------------------------------------------
# per-axis smooth functions. Any transcendental function is evaluated on 1-D arrays over the WHOLE axis (then
# sliced), so a value never depends on where a chunk starts or how long it is; 2-D and 3-D arrays only see
# +, -, *, /, sqrt and comparisons (exactly rounded IEEE operations).
# ------------------------------------------------------------------------------------------------------------


def _features_y(y: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "y": y,
        "zc": 2.5 * np.sin(np.pi * y / 170.0),  # the hemisphere's Z centre bends with Y
        "rip": np.sin(2.0 * np.pi * y / 26.0),
        "bias": 0.18 * (y / 90.0) - 0.40 * (y / 90.0) ** 2,
        "bias_s": np.sin(np.pi * y / 150.0),
    }


def _features_z(z: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "z": z,
        "wx": 1.0 - 0.12 * z / _HEMI_AZ,  # narrower at the top
        "rip": np.sin(2.0 * np.pi * z / 22.0 + 0.7),
        "bias": -0.22 * (z / 63.0) - 0.28 * (z / 63.0) ** 2,
        "bias_s": np.sin(np.pi * z / 100.0),
    }


def _features_x(x: np.ndarray) -> dict[str, np.ndarray]:
    u = (x - _BAG_C[0]) / 40.0
    return {"x": x, "bias": 0.16 + 0.30 * u - 0.18 * u * u}


def _bias_parts(fy: dict, fx: dict, fz: dict) -> tuple[np.ndarray, np.ndarray]:
    """The bias field as ``B_yz[i, k] * B_x[j]`` (float32): exp of a quadratic in each object coordinate times
    a smooth non-separable factor ``1 + 0.08 sin(pi Y / 150) sin(pi Z / 100)``."""
    by = np.exp(fy["bias"])
    bz = np.exp(fz["bias"])
    byz = (by[:, None] * bz[None, :]) * (1.0 + 0.08 * (fy["bias_s"][:, None] * fz["bias_s"][None, :]))
    return byz.astype(np.float32), np.exp(fx["bias"]).astype(np.float32)


def _paint(comp: np.ndarray, fx: np.ndarray, g: np.ndarray, code) -> None:
    """``comp[i, j, k] = code`` where ``fx[j] <= g[i, k]`` -- every shape of the phantom is such a region.

    Only the sub-block where the region can be non-empty is touched (bounding-box shortcut: a shape away from
    the chunk costs a few 2-D operations). ``code`` is an int or a 2-D (i, k) array of codes.
    """
    fmin = fx.min() if fx.size else np.inf
    hit = g >= fmin
    if not hit.any():
        return
    rows = np.flatnonzero(hit.any(axis=1))
    cols = np.flatnonzero(hit.any(axis=0))
    i0, i1, k0, k1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    gs = g[i0:i1, k0:k1]
    js = np.flatnonzero(fx <= gs.max())
    j0, j1 = js[0], js[-1] + 1
    sel = fx[j0:j1][None, :, None] <= gs[:, None, :]
    sub = comp[i0:i1, j0:j1, k0:k1]
    if np.ndim(code) == 0:
        np.copyto(sub, np.uint8(code), where=sel)
    else:
        np.copyto(sub, np.broadcast_to(code[i0:i1, None, k0:k1], sub.shape), where=sel)


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Any, r: Any, xmax: float = np.inf
) -> tuple[np.ndarray, np.ndarray]:
    """(fx, g) of an axis-aligned ellipsoid, cut to X <= xmax: ((X-xc)/rx)^2 <= 1 - ((Y-yc)/ry)^2 - ..."""
    fx = ((x - c[0]) / r[0]) ** 2
    fx = np.where(x <= xmax, fx, np.inf)
    g = 1.0 - ((y[:, None] - c[1]) / r[1]) ** 2 - ((z[None, :] - c[2]) / r[2]) ** 2
    return fx, g


def _compartments(fy: dict, fx: dict, fz: dict) -> np.ndarray:
    """Compartment codes (uint8, shape (ny, nx, nz)) at the voxel centres given by 1-D feature arrays."""
    y, x, z = fy["y"], fx["x"], fz["z"]
    comp = np.zeros((y.size, x.size, z.size), dtype=np.uint8)

    # bag: plastic shell, fluid inside, bubbles in the fluid
    for extra, code in ((_BAG_WALL_MM, _PLASTIC), (0.0, _FLUID)):
        rx, ry, rz = (r + extra for r in _BAG_R)
        px, py, pz = _BAG_P
        fxb = ((x - _BAG_C[0]) / rx) ** px
        g = 1.0 - ((y[:, None] - _BAG_C[1]) / ry) ** py - ((z[None, :] - _BAG_C[2]) / rz) ** pz
        _paint(comp, fxb, g, code)
    for bx, by, bz, br in _BUBBLES:
        _paint(comp, *_ellipsoid(x, y, z, (bx, by, bz), (br, br, br)), _BUBBLE)

    # hemisphere: grey matter everywhere, then white matter inside the cortical shell
    rip = _RIPPLE * (fy["rip"][:, None] * fz["rip"][None, :])
    wx = fz["wx"][None, :]
    zrel = z[None, :] - fy["zc"][:, None]
    fx_out = np.where(x <= 0.0, (x / _HEMI_AX) ** 2, np.inf)
    q_out = (y[:, None] / _HEMI_AY) ** 2 + (zrel / _HEMI_AZ) ** 2 + rip
    _paint(comp, fx_out, (1.0 - q_out) * (wx * wx), _GM)
    t = _CORTEX_MM
    q_in = (y[:, None] / (_HEMI_AY - t)) ** 2 + (zrel / (_HEMI_AZ - t)) ** 2 + rip
    g_in = (1.0 - q_in) * ((wx - t / _HEMI_AX) ** 2)
    # deep white matter (away from the medial face) ...
    _paint(comp, np.where(x <= -t, (x / _HEMI_AX) ** 2, np.inf), g_in, _WM)
    # ... and up to the medial face inside the medial window (no medial cortex there)
    wy, wz, way, waz = _WINDOW
    window = ((y[:, None] - wy) / way) ** 2 + ((z[None, :] - wz) / waz) ** 2 <= 1.0
    _paint(comp, np.where((x > -t) & (x <= 0.0), (x / _HEMI_AX) ** 2, np.inf), np.where(window, g_in, -np.inf), _WM)

    # deep grey nuclei, ventricle
    for c, r in _NUCLEI:
        _paint(comp, *_ellipsoid(x, y, z, c, r, xmax=0.0), _DEEP)
    v = _VENT
    zv = v["ztop"] - v["bend"] * ((y - v["yc"]) / v["ay"]) ** 2
    g = 1.0 - ((y[:, None] - v["yc"]) / v["ay"]) ** 2 - ((z[None, :] - zv[:, None]) / v["az"]) ** 2
    _paint(comp, ((x - v["xc"]) / v["ax"]) ** 2, g, _CSF)

    # hypothalamus: one ellipsoid cut by the medial plane; the subregion depends on (Y, Z) only
    fxh, gh = _ellipsoid(x, y, z, _HYPO_C, _HYPO_R, xmax=0.0)
    yr = y[:, None] - _HYPO_C[1]
    zr = z[None, :] - _HYPO_C[2]
    inferior = zr < _HYPO_SPLIT_Z
    codes = np.where(
        yr > _HYPO_ANTERIOR_Y,
        np.where(inferior, _HYP[0], _HYP[1]),
        np.where(yr < _HYPO_POSTERIOR_Y, _HYP[2], np.where(inferior, _HYP[3], _HYP[4])),
    ).astype(np.uint8)
    _paint(comp, fxh, gh, codes)

    # fornix: |X - xf|^2 <= r^2 - (rho - R)^2 on the arc's angular range (a wedge narrower than 180 degrees)
    f = _FORNIX_ARC
    dy = y[:, None] - f["y0"]
    dz = z[None, :] - f["z0"]
    rho = np.sqrt(dy * dy + dz * dz)
    a0, a1 = np.deg2rad(f["a0"]), np.deg2rad(f["a1"])
    in_arc = ((np.cos(a0) * dz - np.sin(a0) * dy) >= 0) & ((np.cos(a1) * dz - np.sin(a1) * dy) <= 0)
    g = np.where(in_arc, f["r"] ** 2 - (rho - f["R"]) ** 2, -np.inf)
    _paint(comp, (x - f["xf"]) ** 2, g, _FORNIX)
    return comp


# ------------------------------------------------------------------------------------------------------------
# counter-based noise: splitmix64 of (seed, side, echo, global voxel index) -> two uniforms -> Rician magnitude
# ------------------------------------------------------------------------------------------------------------
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _splitmix64_scalar(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return v ^ (v >> 31)


def _stream_key(seed: int, side: str, echo: int) -> np.uint64:
    k = _splitmix64_scalar(int(seed) & _MASK64)
    k = _splitmix64_scalar(k ^ (0x4C if side == "L" else 0x52))
    return np.uint64(_splitmix64_scalar(k ^ (0x1000 + echo)))


def _hash_block(
    key: np.uint64,
    i: np.ndarray,
    j: np.ndarray,
    k: np.ndarray,
    shape: tuple[int, int, int],
    out: np.ndarray,
    tmp: np.ndarray,
) -> np.ndarray:
    """splitmix64 of the global linear voxel index (i * n1 + j) * n2 + k, for one stream ``key``."""
    n1, n2 = np.uint64(shape[1]), np.uint64(shape[2])
    # (idx * GAMMA + key) distributes over the three index terms (arithmetic modulo 2^64)
    bi = i.astype(np.uint64) * (n1 * n2) * _GAMMA + key + _GAMMA
    bj = j.astype(np.uint64) * n2 * _GAMMA
    bk = k.astype(np.uint64) * _GAMMA
    np.add((bi[:, None] + bj[None, :])[:, :, None], bk[None, None, :], out=out)
    for shift, mult in ((30, _M1), (27, _M2)):
        np.right_shift(out, np.uint64(shift), out=tmp)
        np.bitwise_xor(out, tmp, out=out)
        np.multiply(out, mult, out=out)
    np.right_shift(out, np.uint64(31), out=tmp)
    np.bitwise_xor(out, tmp, out=out)
    return out


_LN2 = np.float32(math.log(2.0))
_SQRT2 = np.float32(math.sqrt(2.0))


def _neg2log(u: np.ndarray) -> np.ndarray:
    """-2 ln(u) for float32 u in (0, 1], from the exponent bits and an atanh series (|error| < 1e-7 relative).

    Written with +, -, *, / only so that the result does not depend on the array layout or the machine."""
    bits = u.view(np.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(np.float32)  # u = m * 2^e, m in [1, 2)
    big = m > _SQRT2
    m = np.where(big, m * np.float32(0.5), m)  # m in [0.707, 1.414)
    e = (e + big).astype(np.float32)
    s = (m - np.float32(1.0)) / (m + np.float32(1.0))  # |s| <= 0.1716
    z = s * s
    p: np.ndarray | np.float32 = np.float32(1 / 9)
    for c in (1 / 7, 1 / 5, 1 / 3, 1.0):
        p = p * z + np.float32(c)
    return (e * _LN2 + np.float32(2.0) * s * p) * np.float32(-2.0)


_SIN_COEFFS = tuple(np.float32((-1) ** n / math.factorial(2 * n + 1)) for n in range(6, -1, -1))


def _cos_pi(v: np.ndarray) -> np.ndarray:
    """cos(pi v) for float32 v in [0, 1), as sin(x), x = pi (1/2 - v) in (-pi/2, pi/2], by a Taylor polynomial
    to x^13 (|error| < 1e-8)."""
    x = (np.float32(0.5) - v) * np.float32(math.pi)
    z = x * x
    p: np.ndarray | np.float32 = _SIN_COEFFS[0]
    for c in _SIN_COEFFS[1:]:
        p = p * z + c
    return p * x


def _rician(signal: np.ndarray, h: np.ndarray, sigma: float) -> np.ndarray:
    """|signal + n1 + i n2| with n1 = sigma r cos(theta), n2 = sigma r sin(theta) (Box-Muller from the hash).

    |S + n|^2 = S^2 + 2 S sigma r cos(theta) + sigma^2 r^2, so only r^2 = -2 ln u1 and cos(theta) are needed;
    theta is uniform on [0, pi) here, which gives the same distribution of the magnitude."""
    u1 = ((h >> np.uint64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)  # (0, 1)
    v = (h & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)  # [0, 1)
    r2 = _neg2log(u1)
    rc = np.sqrt(r2) * _cos_pi(v)
    sg = np.float32(sigma)
    out = (rc * (np.float32(2.0) * sg) + signal) * signal + r2 * (sg * sg)
    # >= 0 in exact arithmetic ((S + sigma r cos)^2 + (sigma r sin)^2); float32 rounding can take it a few ulps
    # below 0 where S ~ -sigma r cos, which gave NaN voxels (seen at 0.15 mm)
    return np.sqrt(np.maximum(out, np.float32(0.0)))


# ------------------------------------------------------------------------------------------------------------
# block functions (pure: everything from the global index range of the block)
# ------------------------------------------------------------------------------------------------------------
_SLAB_VOXELS = 1 << 16  # noise is generated in cache-sized slabs (same values, much faster than whole chunks)


def _block_features(s: float, side: str, loc) -> tuple[dict, dict, dict]:
    yf, xf, zf = _axes_full(s, side)
    fy, fx, fz = _features_y(yf), _features_x(xf), _features_z(zf)
    (i0, i1), (j0, j1), (k0, k1) = loc[:3]
    return (
        {k: v[i0:i1] for k, v in fy.items()},
        {k: v[j0:j1] for k, v in fx.items()},
        {k: v[k0:k1] for k, v in fz.items()},
    )


def _render(name: str, s: float, side: str, echoes: int, seed: int, loc) -> np.ndarray:
    """The block ``loc`` (list of (start, stop) per axis) of output ``name``."""
    fy, fx, fz = _block_features(s, side, loc)
    if name == "truth_bias":
        byz, bx = _bias_parts(fy, fx, fz)
        return byz[:, None, :] * bx[None, :, None]
    comp = _compartments(fy, fx, fz)
    if name == "truth_mask":
        return _MASK_LUT[comp]
    if name == "truth_tissue":
        return _TISSUE_LUT[comp]
    if name == "hypothalamus":
        return _hyp_lut(side)[comp]
    # scan
    byz, bx = _bias_parts(fy, fx, fz)
    shape = _shape(s)
    ni, nj, nk = comp.shape
    out = np.empty(comp.shape + ((echoes,) if echoes > 1 else ()), dtype=np.float32)
    gi, gj, gk = (np.arange(a, b) for a, b in loc[:3])
    rows = max(1, _SLAB_VOXELS // max(1, nj * nk))
    luts = [_signal_lut(e) for e in range(echoes)]
    keys = [_stream_key(seed, side, e) for e in range(echoes)]
    hbuf = np.empty((rows, nj, nk), dtype=np.uint64)
    tbuf = np.empty_like(hbuf)
    for a in range(0, ni, rows):
        b = min(ni, a + rows)
        bias = byz[a:b, None, :] * bx[None, :, None]
        for e in range(echoes):
            h = _hash_block(keys[e], gi[a:b], gj, gk, shape, hbuf[: b - a], tbuf[: b - a])
            val = _rician(luts[e][comp[a:b]] * bias, h, NOISE_SIGMA)
            if echoes > 1:
                out[a:b, ..., e] = val
            else:
                out[a:b] = val
    return out


def _block(name: str, s: float, side: str, echoes: int, seed: int, block_info=None) -> np.ndarray:
    return _render(name, s, side, echoes, seed, block_info[None]["array-location"])


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _world_geometry(side: str) -> dict:
    """Spacing-independent truths, computed once by fine sampling (0.1 mm) of the object."""
    step = 0.1
    (cx, cy, cz), (rx, ry, rz) = _HYPO_C, _HYPO_R
    x = np.arange(cx - rx - 1, 0.0 + step / 2, step)
    y = np.arange(cy - ry - 1, cy + ry + 1 + step / 2, step)
    z = np.arange(cz - rz - 1, cz + rz + 1 + step / 2, step)
    comp = _compartments(_features_y(y), _features_x(x), _features_z(z))
    hyp = np.isin(comp, _HYP)
    iy, ix, iz = np.nonzero(hyp)
    centroid_obj = np.array([x[ix].mean(), y[iy].mean(), z[iz].mean()])
    counts = np.bincount(comp.ravel(), minlength=_NCOMP)
    codes = HYPOTHALAMUS_CODES[side]
    volumes = {codes[n]: float(counts[c] * step**3) for n, c in enumerate(_HYP)}
    o2w = _object_to_world_left()
    if side == "R":
        o2w = _MIRROR @ o2w @ _MIRROR  # object frame of a right hemisphere: the left one mirrored
        centroid_obj[0] = -centroid_obj[0]
        normal_obj = np.array([-1.0, 0.0, 0.0])
    else:
        normal_obj = np.array([1.0, 0.0, 0.0])
    return {
        "object_to_world": o2w,
        "medial_plane": {"point_mm": o2w[:3, 3].copy(), "normal": o2w[:3, :3] @ normal_obj},
        "hypothalamus_centroid_mm": o2w[:3, :3] @ centroid_obj + o2w[:3, 3],
        "hypothalamus_volume_mm3": volumes,
    }


def phantom_geometry(spacing_mm: float, side: str = "L") -> dict:
    """Voxel grid and true world geometry of the phantom (computed eagerly; small).

    Parameters
    ----------
    spacing_mm : float
        Isotropic voxel size in mm.
    side : {"L", "R"}
        Hemisphere.

    Returns
    -------
    dict
        ``shape`` (3 ints), ``affine`` (4x4 voxel-centre -> RAS+ world mm), ``spacing_mm``, ``side``,
        ``fov_mm``, ``orientation`` (e.g. ``"PLI"``), ``object_to_world`` (4x4 rigid: the anatomical frame in
        which the phantom is defined), ``medial_plane`` = ``{"point_mm", "normal"}`` (world mm; the unit
        normal points from the hemisphere towards the midline: +x-ish for a left, -x-ish for a right
        hemisphere), ``hypothalamus_centroid_mm`` (world mm, of the five subregions without the fornix) and
        ``hypothalamus_volume_mm3`` (per code, continuous object). The world quantities do not depend on the
        spacing: phantoms at different spacings sample the same object.

    Example
    -------
    >>> g = phantom_geometry(0.1, "L")
    >>> g["shape"], g["orientation"]
    ((1920, 820, 1300), 'PLI')
    """
    s, sd = _check(spacing_mm, side)
    aff = _affine(s, sd)
    w = _world_geometry(sd)
    return {
        "shape": _shape(s),
        "affine": aff,
        "spacing_mm": s,
        "side": sd,
        "fov_mm": FOV_MM,
        "orientation": orientation_code(aff),
        "object_to_world": w["object_to_world"].copy(),
        "medial_plane": {k: v.copy() for k, v in w["medial_plane"].items()},
        "hypothalamus_centroid_mm": w["hypothalamus_centroid_mm"].copy(),
        "hypothalamus_volume_mm3": dict(w["hypothalamus_volume_mm3"]),
    }


_OUTPUTS = {  # name: (dtype, kind)
    "scan": (np.float32, "image"),
    "hypothalamus": (np.uint16, "labels"),
    "truth_mask": (np.uint8, "mask"),
    "truth_tissue": (np.uint8, "labels"),
    "truth_bias": (np.float32, "image"),
}


def _normalize_chunks(chunks: Any, shape: tuple[int, int, int]) -> tuple:
    try:
        if isinstance(chunks, (int, np.integer)):
            chunks = (int(chunks),) * 3
        if not isinstance(chunks, (tuple, list)) or len(chunks) != 3:
            raise ValueError
        return da.core.normalize_chunks(tuple(chunks), shape, dtype=np.float32)
    except (ValueError, TypeError):
        raise HelmError(
            f"chunks must be an int or 3 chunk sizes (x, y, z), got {chunks!r}", hint="e.g. chunks=(128, 128, 128)"
        ) from None


_MNI_OPTIONS = ("fluid", "bag_gap_mm", "header_rotation_deg", "header_rotation_axis")


def _lazy_outputs(
    block,
    lead: tuple,
    tail: tuple,
    norm: tuple,
    echoes: int,
    aff: np.ndarray,
    params: dict,
    info: dict,
    graph_name: str,
    provenance_extra: dict | None = None,
) -> dict:
    """The five lazy output volumes of a phantom (shared by :func:`phantom` and the template phantom).

    ``block(name, *lead, echoes, *tail, block_info=...)`` renders one chunk of output ``name``; ``graph_name``
    (with ``{name}``) names each graph layer.
    """
    out = {}
    for name, (dtype, kind) in _OUTPUTS.items():
        four_d = name == "scan" and echoes > 1
        ch = norm + ((echoes,),) if four_d else norm
        arr = da.map_blocks(
            block,
            name,
            *lead,
            echoes if name == "scan" else 1,
            *tail,
            chunks=ch,
            dtype=dtype,
            meta=np.empty((0,) * len(ch), dtype=dtype),
            name=graph_name.format(name=name),
        )
        vol = make_volume(
            arr,
            aff,
            kind=kind,
            name=name,
            source="phantom",
            provenance=[provenance_record("phantom", dict(params, output=name, **(provenance_extra or {})))],
            attrs={"phantom": dict(info)},
        )
        if four_d:
            vol = vol.assign_coords(echo=("echo", np.array(ECHO_TIMES_MS[:echoes])))
            vol.attrs["echo_times_ms"] = list(ECHO_TIMES_MS[:echoes])
        out[name] = vol
    return out


def phantom(
    spacing_mm: float = 0.5,
    *,
    side: str = "L",
    echoes: int = 1,
    seed: int = 0,
    chunks=(128, 128, 128),
    anatomy: str = "geometric",
    **mni_options,
) -> dict:
    """The built-in phantom as lazy volumes (nothing is computed here).

    Parameters
    ----------
    spacing_mm : float
        Isotropic voxel size in mm (0.1 gives the native 1920 x 820 x 1300 = 2.05 gigavoxel grid).
    side : {"L", "R"}
        Left or right hemisphere (a right one is the exact mirror image of the left one).
    echoes : int
        1 (a 3-D scan: the first echo, TE 5.65 ms) or up to 4 (a 4-D scan, dim ``"echo"`` last, TEs
        :data:`ECHO_TIMES_MS`; echo 0 is bit-identical to the 1-echo scan).
    seed : int
        Noise seed. Everything else is fixed: the same arguments give the same voxels, with any chunking.
    chunks : int or tuple
        Dask chunks along (x, y, z) (any form ``dask.array.core.normalize_chunks`` accepts for 3 axes).
    anatomy : {"geometric", "mni152"}
        ``"geometric"`` (this phantom) or ``"mni152"``: the template phantom made from the MNI ICBM152 template
        (:func:`helm_dask.phantom_mni.phantom_mni`, which receives the other arguments).
    **mni_options
        ``fluid``, ``bag_gap_mm``, ``header_rotation_deg``, ``header_rotation_axis`` of
        :func:`~helm_dask.phantom_mni.phantom_mni` (``None`` means the default); ``anatomy="mni152"`` only.

    Returns
    -------
    dict of str to xarray.DataArray
        ``scan`` (float32 image), ``hypothalamus`` (uint16 labels: 801-805 left or 806-810 right, 250 the
        fornix), ``truth_mask`` (uint8 brain mask, ventricles included), ``truth_tissue`` (uint8 classes, see
        :data:`TISSUE_NAMES`) and ``truth_bias`` (float32 multiplicative field: scan = |signal * bias + noise|).
        All dask-backed, on one grid with one affine (:func:`phantom_geometry`). Each task computes one chunk
        from its global voxel indices; memory per task is a few times the chunk size.

    Example
    -------
    >>> v = phantom(0.1)
    >>> v["scan"].shape, v["scan"].data.npartitions
    ((1920, 820, 1300), 1155)
    >>> vols = phantom(2.0, side="L")
    >>> vols["scan"].shape, vols["scan"].attrs["kind"]
    ((96, 41, 65), 'image')
    >>> sorted(int(v) for v in np.unique(vols["hypothalamus"].values))
    [0, 250, 801, 802, 803, 804, 805]
    """
    unknown = sorted(set(mni_options) - set(_MNI_OPTIONS))
    if unknown:
        raise TypeError(f"phantom() got an unexpected keyword argument {unknown[0]!r}")
    given = {k: v for k, v in mni_options.items() if v is not None}
    if anatomy == "mni152":
        from .phantom_mni import phantom_mni  # here, not at the top: phantom_mni imports this module (a cycle)

        return phantom_mni(spacing_mm, side=side, echoes=echoes, seed=seed, chunks=chunks, **given)
    if anatomy != "geometric":
        raise HelmError(
            f"anatomy must be 'geometric' or 'mni152', got {anatomy!r}",
            hint="geometric: the built-in geometric hemisphere; mni152: made from the MNI152 template",
        )
    if given:
        raise HelmError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to anatomy='mni152' only",
            hint="pass anatomy='mni152', or leave them out for the geometric phantom",
        )
    s, sd = _check(spacing_mm, side)
    if isinstance(echoes, bool) or not isinstance(echoes, (int, np.integer)) or not 1 <= echoes <= 4:
        raise HelmError(
            f"echoes must be an integer from 1 to 4, got {echoes!r}",
            hint="use echoes=1 (a 3-D scan) or echoes=4 (all four echoes)",
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"seed must be a non-negative integer, got {seed!r}", hint="e.g. seed=0")
    echoes, seed = int(echoes), int(seed)
    shape = _shape(s)
    norm = _normalize_chunks(chunks, shape)
    aff = _affine(s, sd)
    params = {"spacing_mm": s, "side": sd, "echoes": echoes, "seed": seed, "model_version": PHANTOM_MODEL_VERSION}
    info = dict(
        params,
        noise_sigma=NOISE_SIGMA,
        echo_times_ms=list(ECHO_TIMES_MS[:echoes]),
        fov_mm=list(FOV_MM),
        orientation="PLI",
    )
    from dask.base import tokenize

    return _lazy_outputs(
        _block, (s, sd), (seed,), norm, echoes, aff, params, info, f"phantom-{{name}}-{tokenize(params, norm)}"
    )
