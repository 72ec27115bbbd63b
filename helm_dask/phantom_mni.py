"""The template phantom: one ex vivo-like hemisphere made from real MRI anatomy (the MNI ICBM152 2009a template
shipped in the ``nilearn`` wheel), lazily, at any spacing -- folded, with fixative in the sulci and opened
ventricles that may be brighter than tissue, darker or dark (Fomblin); :func:`phantom_mni` gives the same five
lazy volumes as :func:`helm_dask.phantom.phantom` (each voxel a function of its global index only),
:func:`phantom_mni_geometry` the true grid and geometry and :func:`template_files` the template files used; how
the anatomy, contrast, bias field and bag are built is in ``docs/method/phantom.md``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from importlib import metadata
from typing import Any, cast

import numpy as np
from scipy import ndimage as ndi

from .errors import HelmError
from .phantom import (
    ECHO_TIMES_MS,
    FORNIX_LABEL,
    HYPOTHALAMUS_CODES,
    NOISE_SIGMA,
    TISSUE_CSF,
    TISSUE_GM,
    TISSUE_HYPOTHALAMUS,
    TISSUE_WM,
    _check,
    _hash_block,
    _lazy_outputs,
    _normalize_chunks,
    _rician,
    _rotation,
    _splitmix64_scalar,
)
from .volume import orientation_code

__all__ = ["FLUIDS", "MNI_MODEL_VERSION", "TEMPLATE_FILES", "phantom_mni", "phantom_mni_geometry", "template_files"]

#: Version of this phantom model; bumped whenever a voxel value would change.
MNI_MODEL_VERSION = 1

#: The template files (in the nilearn distribution, ``nilearn/datasets/data/``).
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Fixative signal at the first echo, by ``fluid`` (white matter is 38, grey matter 60).
FLUIDS = {"bright": 80.0, "dark": 14.0, "none": 0.0}
_S_GM, _S_WM, _S_WALL = 60.0, 38.0, 100.0
# T2* (ms): grey, white, fluid, wall (for multi-echo scans)
_T2_GM, _T2_WM, _T2_FLUID, _T2_WALL = 32.0, 26.0, 90.0, 20.0
_TEXTURE = 0.05  # relative amplitude of the fine tissue texture
_WALL_MM = 0.6  # bag wall thickness
_AIR_MM = 3.0  # air between the bag and the edge of the field of view
_BAG_P = 8.0  # exponent of the rounded-box bag
_TILT_MAX_DEG = 12.0  # the specimen's seeded tilt in the bag, per axis
_WORLD_SHIFT_MM = (1.2, -6.0, 10.0)

# Hypothalamus (left, MNI mm): an ellipsoid lateral to the third ventricle, below the thalamus, from the anterior
# commissure (y ~ +2) to the mammillary bodies (y ~ -12), restricted to tissue.
_HYPO_C = (-4.6, -3.5, -10.5)
_HYPO_R = (3.6, 8.5, 5.5)
_HYPO_ANTERIOR_Y = 0.0  # y above this: anterior
_HYPO_POSTERIOR_Y = -8.0  # y below this: posterior (mammillary)
_HYPO_SPLIT_Z = -10.5  # z below this: inferior (anterior and tuberal parts)
# Fornix column: a 1.2 mm tube along this polyline (MNI mm), from above the anterior commissure down and back to
# the mammillary body.
_FORNIX_PTS = ((-3.2, -1.0, 10.0), (-3.6, -0.5, 2.0), (-4.3, -3.0, -5.0), (-4.6, -8.5, -11.5))
_FORNIX_R = 1.2


# ------------------------------------------------------------------------------------------------------------
# the template, read once per process from the installed nilearn files
# ------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def template_files() -> dict[str, dict[str, str]]:
    """The three template files (T1, grey and white matter probabilities), found in the installed nilearn.

    Returns
    -------
    dict
        ``{key: {"path", "sha256", "file"}}`` for the keys of :data:`TEMPLATE_FILES`.

    Raises
    ------
    HelmError
        When nilearn is not installed (its wheel carries the template; it is never imported) or lacks a file.
    """
    try:
        dist = metadata.distribution("nilearn")
    except metadata.PackageNotFoundError:
        raise HelmError(
            "the MNI152 template phantom needs the nilearn package (its wheel ships the template)",
            hint="pip install nilearn",
        ) from None
    wanted = {v: k for k, v in TEMPLATE_FILES.items()}
    found: dict[str, dict[str, str]] = {}
    for f in dist.files or ():
        if f.name in wanted and "datasets" in str(f):
            path = str(dist.locate_file(f))
            with open(path, "rb") as fh:
                sha = hashlib.sha256(fh.read()).hexdigest()
            found[wanted[f.name]] = {"path": path, "sha256": sha, "file": f.name}
    missing = sorted(set(TEMPLATE_FILES) - set(found))
    if missing:
        raise HelmError(
            f"the installed nilearn has no {TEMPLATE_FILES[missing[0]]}",
            hint="install nilearn >= 0.10 (its wheel ships the MNI152 2009a templates)",
        )
    return found


def _cut_x(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x (MNI mm) of the cut surface at (y, z): a gently curved, irregular surface within ~1.5 mm of the
    midline, a polynomial (exactly rounded operations only, so a voxel's value never depends on its chunk)."""
    yn = y * (1.0 / 80.0)
    zn = z * (1.0 / 60.0)
    return 0.35 + yn * (0.55 + yn * (-0.45 + 0.30 * zn)) + zn * (0.40 + zn * (0.35 - 0.50 * zn)) - 0.45 * yn * zn


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """The left hemisphere's model arrays (cropped, float32) and its geometry (template mm)."""
    import nibabel as nib

    files = template_files()
    # nib.load is typed as returning any image file; the template files are NIfTI-1 images
    load = lambda key: cast(nib.Nifti1Image, nib.load(files[key]["path"]))
    t1 = load("t1")
    aff = np.asarray(t1.affine, dtype=np.float64)
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise HelmError("unexpected template affine (not 1 mm RAS)", path=files["t1"]["path"])
    brain = ndi.binary_fill_holes(np.asarray(t1.dataobj) > 0)
    gm = np.asarray(load("gm").dataobj, dtype=np.float32) / np.float32(255.0)
    wm = np.asarray(load("wm").dataobj, dtype=np.float32) / np.float32(255.0)
    origin = aff[:3, 3]
    # the left hemisphere: template x < cut (+ a margin for the cut's partial volume)
    xs = origin[0] + np.arange(brain.shape[0])
    keep_x = np.flatnonzero(xs <= 4.0)
    idx = np.argwhere(brain[: keep_x[-1] + 1])
    lo = np.maximum(idx.min(axis=0) - 4, 0)
    hi = np.minimum(idx.max(axis=0) + 5, brain.shape)
    hi[0] = min(hi[0], keep_x[-1] + 5)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    # zero-padded crops: spline coefficients on a zero border, so mode "constant" beyond the crop is exact
    pad = 4
    f = np.pad(brain[box].astype(np.float32), pad)
    g = np.pad(gm[box], pad)
    w = np.pad(wm[box], pad)
    coef_g = ndi.spline_filter(g, order=3, output=np.float32, mode="mirror")
    coef_w = ndi.spline_filter(w, order=3, output=np.float32, mode="mirror")
    crop_origin = origin + lo - pad  # template mm of crop voxel (0, 0, 0)
    # hemisphere points (1 mm voxel centres inside the brain on the left of the cut): extent and centroid
    pts = idx + origin
    pts = pts[pts[:, 0] < _cut_x(pts[:, 1], pts[:, 2])]
    # dilated brain (nearest-neighbour lookup decides where the interpolation is needed at all)
    near = ndi.binary_dilation(f > 0, iterations=2)
    return {
        "f": f,
        "coef_g": coef_g,
        "coef_w": coef_w,
        "near": near,
        "origin": crop_origin,
        "points": pts.astype(np.float64),
        "centroid": pts.mean(axis=0),
    }


# ------------------------------------------------------------------------------------------------------------
# geometry: voxel -> bag frame -> template (object) mm -> world
# ------------------------------------------------------------------------------------------------------------


def _check_options(
    fluid: Any, bag_gap_mm: Any, header_rotation_deg: Any, header_rotation_axis: Any
) -> tuple[str, float, float, str]:
    if fluid not in FLUIDS:
        raise HelmError(
            f"fluid must be one of {', '.join(FLUIDS)}, got {fluid!r}",
            hint="bright: fixative brighter than tissue; dark: darker; none: no signal (Fomblin)",
        )
    try:
        gap = float(bag_gap_mm)
        rot = float(header_rotation_deg)
    except (TypeError, ValueError):
        raise HelmError(
            "bag_gap_mm and header_rotation_deg must be numbers", hint="e.g. bag_gap_mm=5, header_rotation_deg=0"
        ) from None
    if not (math.isfinite(gap) and 0.0 <= gap <= 50.0):
        raise HelmError(
            f"bag_gap_mm must be between 0 and 50 mm, got {bag_gap_mm!r}",
            hint="0 presses the bag onto the brain; 5 leaves at least 5 mm of fluid around it",
        )
    if not (math.isfinite(rot) and -360.0 <= rot <= 360.0):
        raise HelmError(f"header_rotation_deg must be an angle in degrees, got {header_rotation_deg!r}", hint="e.g. 30")
    if header_rotation_axis not in ("x", "y", "z"):
        raise HelmError(f"header_rotation_axis must be x, y or z, got {header_rotation_axis!r}")
    return fluid, gap, rot, header_rotation_axis


def _tilt(seed: int) -> np.ndarray:
    """The specimen's seeded tilt in the bag (rotation matrix: bag frame -> template frame)."""
    rng = np.random.default_rng([int(seed), 0x4D4E49])
    return _rotation(tuple(rng.uniform(-_TILT_MAX_DEG, _TILT_MAX_DEG, 3)))


# unit vectors spread evenly over the sphere (Fibonacci lattice)
_SPHERE = np.stack(
    [
        np.sqrt(1.0 - np.linspace(1 - 1 / 256, -1 + 1 / 256, 256) ** 2)
        * np.cos(np.pi * (3.0 - math.sqrt(5.0)) * np.arange(256)),
        np.sqrt(1.0 - np.linspace(1 - 1 / 256, -1 + 1 / 256, 256) ** 2)
        * np.sin(np.pi * (3.0 - math.sqrt(5.0)) * np.arange(256)),
        np.linspace(1 - 1 / 256, -1 + 1 / 256, 256),
    ],
    axis=1,
)


def _bag_radii(q: np.ndarray, c: np.ndarray, r0: np.ndarray, need: float) -> np.ndarray:
    """Radii of the rounded box (centre ``c``, exponent :data:`_BAG_P`) keeping every point of ``q`` at least
    ``need`` mm inside: ``r0`` (the extent plus the gap), widened uniformly by the least margin (to 0.01 mm)
    that keeps the rounded corners that far too -- without it, the corners came to 3.7 mm of the brain with a
    5 mm gap. The distance to a convex bag is a concave function of the point, so its minimum over the
    hemisphere is at a vertex of the hemisphere's convex hull; a ball of radius ``need`` around each vertex is
    tested along 256 directions."""
    from scipy.spatial import ConvexHull

    v = q[ConvexHull(q).vertices]
    pts = (v[:, None, :] + need * _SPHERE[None]).reshape(-1, 3) - c

    def fits(t: float) -> bool:
        return float(np.max(np.sum(np.abs(pts / (r0 + t)) ** _BAG_P, axis=1))) <= 1.0

    lo, hi = 0.0, max(need, 1.0)
    if fits(lo):
        return r0
    while not fits(hi):
        hi *= 2.0
    while hi - lo > 0.01:
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return r0 + hi


@functools.lru_cache(maxsize=16)
def _layout(seed: int, gap: float) -> dict:
    """Spacing-independent layout (bag frame, mm): tilt, hemisphere extent, bag, field of view, bubbles.

    Bag frame: origin at the hemisphere's centroid, axes X (right), Y (anterior), Z (superior) of the scanner;
    template point = R_tilt @ bag point + centroid.
    """
    t = _template()
    rot = _tilt(seed)
    c = t["centroid"]
    q = (t["points"] - c) @ rot  # bag-frame coordinates of the hemisphere's voxel centres
    lo, hi = q.min(axis=0) - 0.5, q.max(axis=0) + 0.5
    bag_c = (lo + hi) / 2.0
    bag_r = _bag_radii(q, bag_c, (hi - lo) / 2.0 + gap, gap + 0.5)
    half = bag_r + _WALL_MM + _AIR_MM
    fov = 2.0 * np.ceil(half)  # whole mm, so every spacing samples the same extent
    # bubbles: seeded spheres pressed onto the tissue, at hemisphere surface points facing away from the centre
    rng = np.random.default_rng([int(seed), 0x425542])
    d = np.linalg.norm(q, axis=1)
    outer = np.flatnonzero(d > np.quantile(d, 0.9))
    bubbles = []
    for n in rng.choice(outer, size=6, replace=False):
        r = float(rng.uniform(1.5, 3.5))
        u = q[n] / max(d[n], 1e-9)
        centre_bag = q[n] + u * (0.8 * r)  # overlapping the surface: the tissue keeps its voxels
        bubbles.append((tuple(rot @ centre_bag + c), r))
    return {
        "rot": rot,
        "centroid": c,
        "bag_c": bag_c,
        "bag_r": bag_r,
        "fov": fov,
        "fov_c": bag_c,
        "bubbles": tuple(bubbles),
    }


def _shape(s: float, lay: dict) -> tuple[int, int, int]:
    # voxel axes: 0 = anterior -> posterior (Y), 1 = right -> left (X), 2 = superior -> inferior (Z)
    fx, fy, fz = lay["fov"]
    n0, n1, n2 = (max(1, int(round(f / s))) for f in (fy, fx, fz))
    return n0, n1, n2


def _bag_axes(s: float, shape: tuple[int, int, int], lay: dict, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bag-frame coordinates (X, Y, Z mm) of the voxel centres along axes 1, 0, 2 (whole axes)."""
    n0, n1, n2 = shape
    cx, cy, cz = lay["fov_c"]
    y = cy + s * ((n0 - 1) / 2.0 - np.arange(n0))
    x = cx + s * ((n1 - 1) / 2.0 - np.arange(n1))
    z = cz + s * ((n2 - 1) / 2.0 - np.arange(n2))
    if side == "R":
        # a right hemisphere is the left one mirrored: voxel j of R is voxel n1 - 1 - j of L
        x = x[::-1].copy()
    return x, y, z


def _vox_to_bag(s: float, shape: tuple[int, int, int], lay: dict) -> np.ndarray:
    n0, n1, n2 = shape
    m = np.zeros((4, 4))
    m[1, 0] = -s
    m[0, 1] = -s
    m[2, 2] = -s
    cx, cy, cz = lay["fov_c"]
    m[:3, 3] = (cx + s * (n1 - 1) / 2.0, cy + s * (n0 - 1) / 2.0, cz + s * (n2 - 1) / 2.0)
    m[3, 3] = 1.0
    return m


def _bag_to_world(lay: dict) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = lay["rot"]
    m[:3, 3] = lay["centroid"] + np.asarray(_WORLD_SHIFT_MM)
    return m


def _header_rotation(deg: float, axis: str, centre: np.ndarray) -> np.ndarray:
    ang = {"x": (deg, 0.0, 0.0), "y": (0.0, deg, 0.0), "z": (0.0, 0.0, deg)}[axis]
    m = np.eye(4)
    m[:3, :3] = _rotation(ang)
    m[:3, 3] = centre - m[:3, :3] @ centre
    return m


_MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])


def _affines(s: float, side: str, lay: dict, rot_deg: float, rot_axis: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored affine, true affine): voxel centre -> RAS+ world mm; they differ by the header rotation."""
    shape = _shape(s, lay)
    true = _bag_to_world(lay) @ _vox_to_bag(s, shape, lay)
    if side == "R":
        flip_j = np.eye(4)
        flip_j[1, 1] = -1.0
        flip_j[1, 3] = shape[1] - 1
        true = _MIRROR @ true @ flip_j
    centre = true[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + true[:3, 3]
    return _header_rotation(rot_deg, rot_axis, centre) @ true, true


# ------------------------------------------------------------------------------------------------------------
# smooth per-axis tables (evaluated on whole axes, then sliced: a voxel's value does not depend on its chunk)
# ------------------------------------------------------------------------------------------------------------


def _bias_tables(x: np.ndarray, y: np.ndarray, z: np.ndarray, lay: dict) -> tuple:
    """7 T-like field in the bag frame = e^{gx} e^{gy} e^{gz} (1 + a Gx Gy Gz): gradients (coil profile) times
    a central brightening (the dielectric effect). About 0.6-1.4 over the brain (0.65-1.24 before the
    central brightening was raised from 0.45 to 1.0)."""
    r = lay["bag_r"]
    c = lay["bag_c"]
    u, v, w = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    ex = np.exp(0.22 * u - 0.10 * u * u)
    ey = np.exp(-0.12 * v - 0.18 * v * v)
    ez = np.exp(0.20 * w - 0.12 * w * w)
    gx, gy, gz = np.exp(-1.4 * u * u), np.exp(-1.4 * v * v), np.exp(-1.4 * w * w)
    return (ex, ey, ez), (gx, gy, gz), 1.0


# texture: plane waves in template mm (wavelength 0.4-2.5 mm), fixed directions and phases
_WAVES = np.random.default_rng(20261205).normal(size=(10, 3))
_WAVES /= np.linalg.norm(_WAVES, axis=1, keepdims=True)
_WAVES *= (2.0 * np.pi / np.geomspace(0.4, 2.5, 10))[:, None]
_PHASES = np.random.default_rng(20261206).uniform(0.0, 2.0 * np.pi, 10)


def _outer3(a: np.ndarray, b: np.ndarray, c: np.ndarray, op=np.add) -> np.ndarray:
    """op(op(a[i], b[j]), c[k]) over (i, j, k) for axis-0, axis-1, axis-2 tables a, b, c."""
    return op(op(a[:, None, None], b[None, :, None]), c[None, None, :])


# ------------------------------------------------------------------------------------------------------------
# one block
# ------------------------------------------------------------------------------------------------------------


def _segment_dist2(p: tuple, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    t = ((p[0] - a[0]) * d[0] + (p[1] - a[1]) * d[1] + (p[2] - a[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return sum((p[k] - (a[k] + t * d[k])) ** 2 for k in range(3))


def _block_model(s: float, side: str, seed: int, gap: float, loc, *, fractions: bool = True, where=None) -> dict:
    """Fractions and compartments of one block: brain weight, grey / white / fluid fractions, bag, bubbles.

    ``fractions=False`` skips the grey/white interpolation (the truth mask needs only the brain); ``where``
    (a function of the object coordinates) restricts the interpolation to the voxels it selects.
    """
    lay = _layout(seed, gap)
    t = _template()
    shape = _shape(s, lay)
    bx, by, bz = _bag_axes(s, shape, lay, side)
    (i0, i1), (j0, j1), (k0, k1) = loc[:3]
    # template (object) mm of every voxel: obj = R (bx[j], by[i], bz[k]) + c, as exact outer sums of 1-D tables
    R, c = lay["rot"], lay["centroid"]
    obj = [_outer3(R[d, 1] * by[i0:i1], R[d, 0] * bx[j0:j1], R[d, 2] * bz[k0:k1] + c[d]) for d in range(3)]
    nshape = obj[0].shape
    # where the (dilated) template brain is, by nearest-neighbour lookup: only there is anything interpolated
    crop = [(obj[d] - t["origin"][d]) for d in range(3)]
    near_idx = [np.rint(crop[d]).astype(np.intp) for d in range(3)]
    inside = np.ones(nshape, dtype=bool)
    for d in range(3):
        inside &= (near_idx[d] >= 0) & (near_idx[d] < t["near"].shape[d])
    if where is not None:
        inside &= where(obj)
    sel = np.flatnonzero(inside.ravel())
    if sel.size:
        nb = t["near"][tuple(near_idx[d].ravel()[sel] for d in range(3))]
        sel = sel[nb]
    f = np.zeros(nshape, np.float32)
    g = np.zeros(nshape, np.float32)
    w = np.zeros(nshape, np.float32)
    if sel.size:
        coords = np.stack([crop[d].ravel()[sel] for d in range(3)])
        f.ravel()[sel] = ndi.map_coordinates(t["f"], coords, order=1, mode="constant", cval=0.0)
        if fractions:
            # cubic B-splines: smooth at 0.1 mm (a linear interpolation of 1 mm maps shows its grid)
            g.ravel()[sel] = ndi.map_coordinates(t["coef_g"], coords, order=3, prefilter=False, mode="mirror")
            w.ravel()[sel] = ndi.map_coordinates(t["coef_w"], coords, order=3, prefilter=False, mode="mirror")
    g = np.clip(g, 0.0, 1.0)
    w = np.clip(w, 0.0, 1.0)
    tot = g + w
    over = tot > 1.0
    g = np.where(over, g / np.maximum(tot, 1e-6), g)
    w = np.where(over, w / np.maximum(tot, 1e-6), w)
    xc = _cut_x(obj[1], obj[2])
    truth = (f >= 0.5) & (obj[0] < xc)
    # partial volume at the voxel size: the linear template mask rises from 0 to 1 over ~1 mm, the cut is exact
    steep = 1.0 / min(s, 1.0)
    b = np.clip(0.5 + (f - 0.5) * steep, 0.0, 1.0) * np.clip(0.5 + (xc - obj[0]) / s, 0.0, 1.0)
    b = b.astype(np.float32)
    # bag (bag frame, separable), bubbles (object frame)
    ax, ay, az = (
        np.abs((v - lay["bag_c"][d]) / lay["bag_r"][d]) ** _BAG_P
        for d, v in ((0, bx[j0:j1]), (1, by[i0:i1]), (2, bz[k0:k1]))
    )
    bag_in = _outer3(ay, ax, az) <= 1.0
    wr = lay["bag_r"] + _WALL_MM
    ax, ay, az = (
        np.abs((v - lay["bag_c"][d]) / wr[d]) ** _BAG_P for d, v in ((0, bx[j0:j1]), (1, by[i0:i1]), (2, bz[k0:k1]))
    )
    wall = (_outer3(ay, ax, az) <= 1.0) & ~bag_in
    bubble = np.zeros(nshape, dtype=bool)
    for (cx, cy, cz), r in lay["bubbles"]:
        bubble |= ((obj[0] - cx) ** 2 + (obj[1] - cy) ** 2 + (obj[2] - cz) ** 2) <= r * r
    bubble &= bag_in & ~truth
    return {
        "obj": obj,
        "f": f,
        "g": g,
        "w": w,
        "b": b,
        "truth": truth,
        "bag_in": bag_in,
        "wall": wall,
        "bubble": bubble,
        "axes": (bx, by, bz),
        "lay": lay,
        "shape": shape,
    }


def _hypothalamus(m: dict, side: str) -> np.ndarray:
    obj, g, w = m["obj"], m["g"], m["w"]
    x, y, z = obj
    cx, cy, cz = _HYPO_C
    rx, ry, rz = _HYPO_R
    ell = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    tissue = m["truth"] & (g + w >= 0.5)
    hyp = ell & tissue
    out = np.zeros(x.shape, np.uint16)
    # not "no hypothalamus here": the fornix rises above it, and a block holding only fornix voxels lost them
    # (a chunk-dependent output, seen with the NIfTI writer's 16-plane slabs)
    if not _in_hypothalamus_box(obj).any():
        return out
    codes = HYPOTHALAMUS_CODES[side]  # ant-inf, ant-sup, posterior, tub-inf, tub-sup
    inferior = z < _HYPO_SPLIT_Z
    sub = np.where(
        y > _HYPO_ANTERIOR_Y,
        np.where(inferior, codes[0], codes[1]),
        np.where(y < _HYPO_POSTERIOR_Y, codes[2], np.where(inferior, codes[3], codes[4])),
    )
    out[hyp] = sub[hyp]
    d2 = np.full(x.shape, np.inf)
    pts = [np.asarray(p, dtype=np.float64) for p in _FORNIX_PTS]
    for a, bb in zip(pts[:-1], pts[1:]):
        d2 = np.minimum(d2, _segment_dist2(obj, a, bb))
    out[(d2 <= _FORNIX_R**2) & tissue & (hyp | (z > _HYPO_C[2]))] = FORNIX_LABEL
    return out


def _tissue(m: dict, hyp: np.ndarray) -> np.ndarray:
    g, w = m["g"], m["w"]
    csf = 1.0 - g - w
    cls = np.where(g >= np.maximum(w, csf), TISSUE_GM, np.where(w >= csf, TISSUE_WM, TISSUE_CSF)).astype(np.uint8)
    cls = np.where(m["truth"], cls, np.uint8(0))
    cls[(hyp > 0) & (hyp != FORNIX_LABEL)] = TISSUE_HYPOTHALAMUS
    return cls


def _bias(m: dict, loc) -> np.ndarray:
    bx, by, bz = m["axes"]
    (ex, ey, ez), (gx, gy, gz), a = _bias_tables(bx, by, bz, m["lay"])
    (i0, i1), (j0, j1), (k0, k1) = loc[:3]
    e = _outer3(ey[i0:i1], ex[j0:j1], ez[k0:k1], np.multiply)
    gg = _outer3(gy[i0:i1], gx[j0:j1], gz[k0:k1], np.multiply)
    return (e * (1.0 + a * gg) / (1.0 + 0.475 * a)).astype(np.float32)


def _texture(m: dict, s: float, side: str, loc) -> np.ndarray:
    """Fine multiplicative tissue texture: plane waves in template mm, as products of 1-D complex tables."""
    lay = m["lay"]
    bx, by, bz = _bag_axes(s, m["shape"], lay, side)
    R, c = lay["rot"], lay["centroid"]
    (i0, i1), (j0, j1), (k0, k1) = loc[:3]
    acc = np.zeros(m["f"].shape, np.float64)
    for kv, ph in zip(_WAVES, _PHASES):
        kb = kv @ R  # k . (R b + c) = (R^T k) . b + k . c
        ey = np.exp(1j * (kb[1] * by + ph + float(kv @ c)))[i0:i1]
        ex = np.exp(1j * (kb[0] * bx))[j0:j1]
        ez = np.exp(1j * (kb[2] * bz))[k0:k1]
        acc += _outer3(ey, ex, ez, np.multiply).real
    return (1.0 + (_TEXTURE / math.sqrt(len(_WAVES) / 2.0)) * acc).astype(np.float32)


def _stream_key(seed: int, side: str, echo: int) -> np.uint64:
    k = _splitmix64_scalar((int(seed) ^ 0x4D4E4931) & ((1 << 64) - 1))
    k = _splitmix64_scalar(k ^ (0x4C if side == "L" else 0x52))
    return np.uint64(_splitmix64_scalar(k ^ (0x2000 + echo)))


def _in_hypothalamus_box(obj: list) -> np.ndarray:
    lo = np.minimum(np.min(_FORNIX_PTS, axis=0), np.subtract(_HYPO_C, _HYPO_R)) - 2.0
    hi = np.maximum(np.max(_FORNIX_PTS, axis=0), np.add(_HYPO_C, _HYPO_R)) + 2.0
    return (
        (obj[0] >= lo[0])
        & (obj[0] <= hi[0])
        & (obj[1] >= lo[1])
        & (obj[1] <= hi[1])
        & (obj[2] >= lo[2])
        & (obj[2] <= hi[2])
    )


def _render(name: str, s: float, side: str, echoes: int, seed: int, fluid: str, gap: float, loc) -> np.ndarray:
    if name == "truth_bias":
        lay = _layout(seed, gap)
        return _bias({"axes": _bag_axes(s, _shape(s, lay), lay, side), "lay": lay}, loc)
    if name == "truth_mask":
        return _block_model(s, side, seed, gap, loc, fractions=False)["truth"].astype(np.uint8)
    if name == "hypothalamus":
        return _hypothalamus(_block_model(s, side, seed, gap, loc, where=_in_hypothalamus_box), side)
    m = _block_model(s, side, seed, gap, loc)
    hyp = _hypothalamus(m, side)
    if name == "hypothalamus":
        return hyp
    if name == "truth_tissue":
        return _tissue(m, hyp)
    # scan: brain (grey, white, fluid-filled fraction, textured tissue) and what surrounds it
    tex = _texture(m, s, side, loc)
    bias = _bias(m, loc)
    b, g, w = m["b"], m["g"], m["w"]
    fl = np.float32(FLUIDS[fluid])
    outside_fluid = (m["bag_in"] & ~m["bubble"]).astype(np.float32)
    wall = m["wall"].astype(np.float32)
    shape = m["f"].shape
    out = np.empty(shape + ((echoes,) if echoes > 1 else ()), dtype=np.float32)
    gi, gj, gk = (np.arange(a, c) for a, c in loc[:3])
    full = m["shape"]
    hbuf = np.empty(shape, dtype=np.uint64)
    tbuf = np.empty_like(hbuf)
    for e in range(echoes):
        dte = ECHO_TIMES_MS[e] - ECHO_TIMES_MS[0]
        sg, sw = _S_GM * math.exp(-dte / _T2_GM), _S_WM * math.exp(-dte / _T2_WM)
        sf, swall = float(fl) * math.exp(-dte / _T2_FLUID), _S_WALL * math.exp(-dte / _T2_WALL)
        brain = (g * np.float32(sg) + w * np.float32(sw)) * tex + (1.0 - g - w) * np.float32(sf)
        around = outside_fluid * np.float32(sf) + wall * np.float32(swall)
        signal = (b * brain + (1.0 - b) * around) * bias
        h = _hash_block(_stream_key(seed, side, e), gi, gj, gk, full, hbuf, tbuf)
        val = _rician(signal.astype(np.float32), h, NOISE_SIGMA)
        if echoes > 1:
            out[..., e] = val
        else:
            out[...] = val
    return out


def _block(name, s, side, echoes, seed, fluid, gap, block_info=None):
    return _render(name, s, side, echoes, seed, fluid, gap, block_info[None]["array-location"])


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------


def phantom_mni_geometry(
    spacing_mm: float,
    side: str = "L",
    *,
    seed: int = 0,
    bag_gap_mm: float = 5.0,
    header_rotation_deg: float = 0.0,
    header_rotation_axis: str = "z",
) -> dict:
    """Voxel grid and true world geometry of the template phantom (eager; small).

    Parameters
    ----------
    spacing_mm : float
        Isotropic voxel size in mm.
    side : {"L", "R"}
        Hemisphere.
    seed, bag_gap_mm, header_rotation_deg, header_rotation_axis
        As in :func:`phantom_mni` (the seed decides the tilt in the bag, so the geometry).

    Returns
    -------
    dict
        Like :func:`helm_dask.phantom.phantom_geometry`: ``shape``, ``affine`` (as stored, header rotation
        included), ``true_affine`` (the anatomy's), ``spacing_mm``, ``side``, ``fov_mm``, ``orientation``,
        ``tilt`` (3x3, bag -> template), ``medial_plane`` ``{"point_mm", "normal"}`` in the stored world (normal
        from the hemisphere towards the midline) and ``hypothalamus_centroid_mm`` (stored world).
    """
    s, sd = _check(spacing_mm, side)
    _, gap, rot, axis = _check_options("bright", bag_gap_mm, header_rotation_deg, header_rotation_axis)
    lay = _layout(int(seed), gap)
    aff, true = _affines(s, sd, lay, rot, axis)
    # template -> stored world: stored = H @ true; true maps voxel -> world, and template -> world is a shift
    # (left) or the mirrored shift (right)
    t2w = np.eye(4)
    t2w[:3, 3] = np.asarray(_WORLD_SHIFT_MM)
    if sd == "R":
        t2w = _MIRROR @ t2w
    h = aff @ np.linalg.inv(true)
    m = h @ t2w
    # the medial plane: the template's mid-sagittal plane (normal +x, towards the midline for a left
    # hemisphere) through the cut at y = z = 0; the cut itself bends by less than 1 degree from it
    p_mid = np.array([float(_cut_x(np.array(0.0), np.array(0.0))), 0.0, 0.0])
    nrm = np.array([1.0, 0.0, 0.0])
    hc = np.array(_HYPO_C)
    world = lambda p: m[:3, :3] @ p + m[:3, 3]
    return {
        "shape": _shape(s, lay),
        "affine": aff,
        "true_affine": true,
        "spacing_mm": s,
        "side": sd,
        "fov_mm": tuple(float(v) for v in (lay["fov"][1], lay["fov"][0], lay["fov"][2])),
        "orientation": orientation_code(aff),
        "tilt": lay["rot"].copy(),
        "medial_plane": {"point_mm": world(p_mid), "normal": m[:3, :3] @ nrm},
        "hypothalamus_centroid_mm": world(hc),
    }


def phantom_mni(
    spacing_mm: float = 1.0,
    *,
    side: str = "L",
    fluid: str = "bright",
    bag_gap_mm: float = 5.0,
    header_rotation_deg: float = 0.0,
    header_rotation_axis: str = "z",
    echoes: int = 1,
    seed: int = 0,
    chunks=(128, 128, 128),
) -> dict:
    """The template phantom as lazy volumes (nothing is computed here).

    Parameters
    ----------
    spacing_mm : float
        Isotropic voxel size in mm (0.1 gives about 2 gigavoxels).
    side : {"L", "R"}
        Hemisphere; a right one is the mirror image of the left one.
    fluid : {"bright", "dark", "none"}
        The fixative in the bag, the sulci and the opened ventricles: brighter than tissue, darker, or no signal
        (Fomblin).
    bag_gap_mm : float
        Fluid between the hemisphere and the bag: at least this much everywhere, exactly this much where the
        hemisphere is widest along the bag's axes (0: the bag presses on the brain).
    header_rotation_deg, header_rotation_axis : float, {"x", "y", "z"}
        The stored affine disagrees with the anatomy by this rotation (about the field of view's centre).
    echoes : int
        1 to 4 (4-D scan with T2* decay, dim ``"echo"`` last).
    seed : int
        Noise, tilt in the bag and bubbles.
    chunks : int or tuple
        Dask chunks along (x, y, z).

    Returns
    -------
    dict of str to xarray.DataArray
        ``scan``, ``hypothalamus``, ``truth_mask``, ``truth_tissue``, ``truth_bias`` as in
        :func:`helm_dask.phantom.phantom`; ``truth_mask`` is the template's brain on the hemisphere's side of
        the cut, holes filled (sulci and ventricles included, nothing added by morphology).

    Example
    -------
    >>> v = phantom_mni(3.0, fluid="dark")
    >>> v["scan"].attrs["phantom"]["anatomy"], v["scan"].ndim
    ('mni152', 3)
    """
    s, sd = _check(spacing_mm, side)
    fluid, gap, rot, axis = _check_options(fluid, bag_gap_mm, header_rotation_deg, header_rotation_axis)
    if isinstance(echoes, bool) or not isinstance(echoes, (int, np.integer)) or not 1 <= echoes <= 4:
        raise HelmError(f"echoes must be an integer from 1 to 4, got {echoes!r}", hint="e.g. echoes=1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HelmError(f"seed must be a non-negative integer, got {seed!r}", hint="e.g. seed=0")
    echoes, seed = int(echoes), int(seed)
    lay = _layout(seed, gap)
    shape = _shape(s, lay)
    norm = _normalize_chunks(chunks, shape)
    aff, _ = _affines(s, sd, lay, rot, axis)
    files = template_files()
    params = {
        "anatomy": "mni152",
        "spacing_mm": s,
        "side": sd,
        "fluid": fluid,
        "bag_gap_mm": gap,
        "header_rotation_deg": rot,
        "header_rotation_axis": axis,
        "echoes": echoes,
        "seed": seed,
        "model_version": MNI_MODEL_VERSION,
    }
    info = dict(
        params,
        noise_sigma=NOISE_SIGMA,
        echo_times_ms=list(ECHO_TIMES_MS[:echoes]),
        fov_mm=[float(v) for v in (lay["fov"][1], lay["fov"][0], lay["fov"][2])],
        template={k: {"file": v["file"], "sha256": v["sha256"]} for k, v in files.items()},
    )
    from dask.base import tokenize

    return _lazy_outputs(
        _block,
        (s, sd),
        (seed, fluid, gap),
        norm,
        echoes,
        aff,
        params,
        info,
        f"phantom-mni-{{name}}-{tokenize(params, norm)}",
        provenance_extra={"template": info["template"]},
    )
