"""In-memory references: each pipeline stage as plain NumPy / SciPy / scikit-learn / nibabel on the WHOLE array.

    python bench/reference.py --input-spacing 1.0 [--spacing 0.3|native] [--stages orient bias ...]
                              [--workdir DIR] [--max-gb 20] [--keep-cache] [--note TEXT]
    python bench/reference.py --input-spacing 0.3 --spacing native --published-mirror [--max-gb 22.5] [--helm-only]

``--published-mirror`` (issue 21) instead compares, on ONE merged map (k = 6) of the phantom hemisphere, the
published mirroring method re-implemented in memory (hsynex ``label_maps/rotation.py`` + ``mesh.py``:
``scipy.optimize.fmin`` over six rigid parameters, then the whole-brain map by a ``RegularGridInterpolator`` at
truncated indices; functions ``published_*`` below) with helm-dask's mirror stage run by ``run`` itself on a copy
of a run stopped after merge (``WORKDIR/run_<in>_<work>_k6``, made first if missing, unmeasured), each in its
own process: rows ``reference:published-mirror`` (the child's ``VmHWM``) and ``pipeline:mirror-one-map`` (summed
RSS of its process tree, 2 workers), both notes with the cost each plane reaches under both cost functions, the
angle between the planes, their distance at the map's centroid, each plane against the phantom's true medial
plane, and the time and memory ratios.

What a scientist would write with the volume in memory, one stage at a time, each stage in its own fresh
subprocess so that its peak RSS is that stage's alone (the kernel's high-water mark ``VmHWM`` of the child: its
Python, libraries, inputs held in memory and every temporary; no sampling gap). One row per stage, stage
``reference:<stage>``, next to the ``pipeline:<stage>`` rows of ``bench/pipeline.py``:

    orient      nibabel load of scan + labels (gunzip included), ``as_closest_canonical``, a contiguous RAS+ copy
                (the bench phantom is a left hemisphere: no left-right ``np.flip``, which would add one copy)
    background  a PLAIN method, not ours (ours has no in-memory twin): Otsu threshold air | signal on the whole
                histogram, Otsu again inside the signal (bright fluid | tissue), largest connected component
                (``ndimage.label``), ``binary_fill_holes``. Its Dice against the phantom's true mask is in the note;
                it is NOT passed on (a global threshold cannot separate the fluid under the phantom's 0.7-1.4 bias
                field, the mask takes in fluid): the later stages get the phantom's true brain mask, so that they
                work on a brain-sized mask like the pipeline's
    resample    mask applied, ``ndimage.zoom(order=1)`` of the image to the working spacing (no anti-aliasing),
                ``order=0`` for mask and labels (skipped for ``--spacing native``)
    bias        degree-3 polynomial (20 terms) of the log image fitted by ``np.linalg.lstsq`` to all in-mask
                voxels, alternating with a 3-class hard assignment (5 iterations); field on the whole grid,
                corrected image
    kmeans      ``sklearn.cluster.KMeans(n_init=1, random_state=0)`` on all in-mask intensities, k = 4..9,
                six label maps (clusters ranked by intensity)
    merge       ``ndimage.binary_closing`` (1.2 mm ball) of the hypothalamus labels' union on the whole volume
                (padded so that the border does not erode it), added voxels take the nearest code
                (``distance_transform_edt`` indices), then the six k-means maps overridden by it
    mirror      ``ndimage.affine_transform(order=0)`` of each of the six merged maps onto a whole-brain grid twice
                the width (x < 0 the hemisphere, x > 0 its mirror image with codes 801-805 -> 806-810); the
                medial plane is the phantom's true one (the plane fit is not part of this reference)

Timing: ``wall_s`` is the stage's computation with its inputs already in memory (loading them from the cache is
reported in the note and excluded), except ``orient``, whose work IS reading the NIfTI files. Voxels: the input
scan's voxel count (as in the pipeline rows); the note gives the grid the stage works on.

Memory guard: before running a stage its peak is predicted as ``base + bytes_per_voxel * N`` (N = voxels of the
grid the stage works on; the bytes per voxel measured at the largest smaller size already run, stored in
``WORKDIR/reference_memory.json``, else the built-in values below). A stage predicted above ``--max-gb`` is not
run: its row has an empty ``wall_s`` and the note ``does not fit: predicted X GB at N voxels; stops at ~M
voxels``. A running stage whose RSS passes ``--max-gb`` is killed (and says so).

Stages pass their outputs to the next through ``.npy`` files in ``WORKDIR/reference_<in>mm_<work>/`` (written
after the measurement; deleted at the end unless ``--keep-cache``; at 0.1 mm input they take ~15 GB of disk).
When an upstream reference did not run (did not fit), a stage gets its inputs elsewhere, unmeasured, and says so:
the RAS+ scan and labels from the lazy phantom itself (bit-identical to what the orient reference reads), the
later intermediates from helm-dask's own output of the pipeline run with the same spacings
(``WORKDIR/run_<in>_<work>``, written by ``bench/pipeline.py``), both streamed chunk by chunk.

Rows go to ``bench/results/results.csv``, or to ``$HELM_BENCH_RESULTS`` when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: F401  (first: it puts this checkout's package ahead of the installed one)

STAGES = ("orient", "background", "resample", "bias", "kmeans", "merge", "mirror")
KS = (4, 5, 6, 7, 8, 9)
CLOSING_RADIUS_MM = 1.2
MARGIN_MM = 10.0
RIGHT_CODES = {801: 806, 802: 807, 803: 808, 804: 809, 805: 810}
GIB = 2**30

#: Built-in memory model (used when WORKDIR/reference_memory.json has no measurement for a stage): peak RSS =
#: base_mb + bytes_per_voxel * N. Measured with this script at 0.5 mm input (native: 16.4 M voxels; 0.3 mm
#: working grid: 75.7 M voxels), numpy 2.4 / scipy 1.17 / scikit-learn 1.9.
DEFAULT_MODEL = {
    "orient": {"n": 16_373_760, "base_mb": 62, "bytes_per_voxel": 12.6},
    "background": {"n": 16_373_760, "base_mb": 62, "bytes_per_voxel": 17.1},
    "resample": {"n": 92_027_520, "base_mb": 62, "bytes_per_voxel": 7.0},
    "bias": {"n": 75_653_760, "base_mb": 62, "bytes_per_voxel": 139.4},
    "kmeans": {"n": 75_653_760, "base_mb": 203, "bytes_per_voxel": 30.0},
    "merge": {"n": 75_653_760, "base_mb": 62, "bytes_per_voxel": 25.1},
    "mirror": {"n": 75_653_760, "base_mb": 62, "bytes_per_voxel": 40.9},
    # issue 21: the published code, 22.4 GB on one map of the 0.3 mm phantom hemisphere (its 75.7 M-voxel grid)
    "published-mirror": {"n": 75_653_760, "base_mb": 62, "bytes_per_voxel": 317.0},
}

#: Where helm-dask's pipeline keeps the same intermediate (fallback input when the upstream reference did not fit).
PIPELINE_NAMES = {
    "image_ws": "image_ws",
    "mask_ws": "mask",
    "hyp_ws": "hypothalamus",
    "preprocessed": "preprocessed",
    **{f"kmeans_k{k}": f"kmeans_k{k}" for k in KS},
    **{f"hemi_k{k}": f"hemi_k{k}" for k in KS},
}


#: On the native grid the working-grid inputs are the RAS+ ones (the image masked while loading).
NATIVE_ALIAS = {"mask_ws": ["mask_ras"], "hyp_ws": ["hyp_ras"], "image_ws": ["scan_ras", "mask_ras"]}


def stage_inputs(stage: str) -> list[str]:
    return {
        "orient": [],
        "background": ["scan_ras"],
        "resample": ["scan_ras", "mask_ras", "hyp_ras"],
        "bias": ["image_ws", "mask_ws"],
        "kmeans": ["preprocessed", "mask_ws"],
        "merge": ["hyp_ws"] + [f"kmeans_k{k}" for k in KS],
        "mirror": ["mask_ws"] + [f"hemi_k{k}" for k in KS],
        "published-mirror": [f"hemi_k{MIRROR_K}"],
        "helm-mirror": [],
    }[stage]


# ----------------------------------------------------------------------------------------------------------
# the cache of intermediates (plain .npy + one JSON of affines)
# ----------------------------------------------------------------------------------------------------------


class Cache:
    def __init__(self, root: Path, native: bool):
        self.root, self.native = Path(root), native
        self.root.mkdir(parents=True, exist_ok=True)
        self._aff = self.root / "affines.json"

    def path(self, name: str) -> Path:
        return self.root / f"{name}.npy"

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def affine(self, name: str) -> np.ndarray:
        return np.array(json.loads(self._aff.read_text())[name])

    def set_affine(self, name: str, affine) -> None:
        d = json.loads(self._aff.read_text()) if self._aff.exists() else {}
        d[name] = np.asarray(affine, dtype=float).tolist()
        self._aff.write_text(json.dumps(d))

    def save(self, name: str, arr: np.ndarray, affine) -> None:
        tmp = self.root / f".{name}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, self.path(name))
        self.set_affine(name, affine)

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if self.native and name == "image_ws" and not self.has(name):
            # native working grid: the masked scan (the masking is part of loading, as in the pipeline's stage)
            img, aff = self.load("scan_ras")
            img[self.load("mask_ras")[0] == 0] = 0
            return img, aff
        if self.native and not self.has(name) and name in ("mask_ws", "hyp_ws"):
            return self.load(name.replace("_ws", "_ras"))
        return np.load(self.path(name)), self.affine(name)


# ----------------------------------------------------------------------------------------------------------
# the references (run in the child; plain NumPy / SciPy / scikit-learn / nibabel, no dask)
# ----------------------------------------------------------------------------------------------------------


def ref_orient(cache: Cache, a) -> tuple[dict, str]:
    import nibabel as nib

    out = {}
    for name, path in (("scan_ras", a.scan), ("hyp_ras", a.hyp)):
        img = nib.as_closest_canonical(nib.load(path))
        arr = np.ascontiguousarray(np.asanyarray(img.dataobj))  # the RAS+ copy (nibabel gives a strided view)
        out[name] = (arr, img.affine.copy())
    return out, f"nibabel load + as_closest_canonical of scan and labels (gunzip included), {out['scan_ras'][0].shape}"


def _otsu(values: np.ndarray, bins: int = 1024) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(edges[1 + np.argmax((w0 * w1 * (mu0 - mu1) ** 2)[:-1])])


def ref_background(cache: Cache, a) -> tuple[dict, str]:
    from scipy import ndimage as ndi

    img, aff = a.inputs["scan_ras"]
    t_air = _otsu(img)  # air (noise floor) | signal
    signal = img > t_air
    t_fluid = _otsu(img[signal])  # tissue | fluid inside the signal (the phantom's fluid is bright)
    brain = signal & (img < t_fluid)
    del signal
    lab, n = ndi.label(brain)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    brain = lab == sizes.argmax()
    del lab
    brain = ndi.binary_fill_holes(brain)
    frac = brain.mean()
    return (
        {"mask_ras_plain": (brain.view(np.uint8), aff)},
        f"plain method: Otsu {t_air:.1f} + Otsu {t_fluid:.1f} + largest of {n} components + fill holes; "
        f"mask {100 * frac:.1f}% of the grid",
    )


def work_grid(shape, affine, spacing_mm: float):
    """zoom(grid_mode=True) grid: n_new = round(n s / s_new) (halves up), edges of the field of view kept."""
    s = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    new = tuple(max(1, int(np.floor(n * si / spacing_mm + 0.5))) for n, si in zip(shape, s))
    r = np.array([n / m for n, m in zip(shape, new)])
    m = np.eye(4)
    m[:3, :3] = np.diag(r)
    m[:3, 3] = -0.5 + r / 2  # first new voxel centre, in old voxel units
    return new, np.asarray(affine) @ m


def ref_resample(cache: Cache, a) -> tuple[dict, str]:
    from scipy import ndimage as ndi

    img, aff = a.inputs["scan_ras"]
    mask = a.inputs["mask_ras"][0]
    hyp = a.inputs["hyp_ras"][0]
    new, aff_ws = work_grid(img.shape, aff, float(a.spacing))
    zoom = [m / n for m, n in zip(new, img.shape)]
    img[mask == 0] = 0  # the masked image is what the pipeline resamples
    kw = dict(zoom=zoom, mode="nearest", grid_mode=True)
    out = {
        "image_ws": (ndi.zoom(img, order=1, **kw), aff_ws),
        "mask_ws": (ndi.zoom(mask, order=0, **kw), aff_ws),
        "hyp_ws": (ndi.zoom(hyp, order=0, **kw), aff_ws),
    }
    return out, f"zoom {img.shape} -> {new} (image order 1, mask and labels order 0)"


def _poly_terms(degree: int = 3) -> list[tuple[int, int, int]]:
    return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]


def ref_bias(cache: Cache, a, n_iter: int = 5) -> tuple[dict, str]:
    img, aff = a.inputs["image_ws"]
    mask = a.inputs["mask_ws"][0] > 0
    shape = img.shape
    u_axes = [(np.arange(n) - (n - 1) / 2) / max((n - 1) / 2, 1) for n in shape]  # voxel coords in [-1, 1]
    idx = np.nonzero(mask)
    u = [u_axes[d][idx[d]] for d in range(3)]
    del idx
    terms = _poly_terms(3)
    A = np.empty((len(u[0]), len(terms)))
    for t, (i, j, k) in enumerate(terms):
        A[:, t] = u[0] ** i * u[1] ** j * u[2] ** k
    del u
    y = np.log(np.maximum(img[mask], 1e-3).astype(np.float64))
    field = np.zeros_like(y)
    mu = np.quantile(y, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(n_iter):
        r = y - field
        cls = np.searchsorted((mu[:-1] + mu[1:]) / 2, r)  # nearest of 3 class means (1-D)
        mu = np.bincount(cls, r, 3) / np.maximum(np.bincount(cls, minlength=3), 1)
        coef = np.linalg.lstsq(A, y - mu[cls], rcond=None)[0]
        field = A @ coef
        coef[0] -= field.mean()  # mean log-bias 0 inside the mask
        field -= field.mean()
    del A, y, field, r, cls
    logb = np.zeros(shape, np.float32)  # the field on the whole grid
    for c, (i, j, k) in zip(coef, terms):
        logb += (c * u_axes[0] ** i)[:, None, None] * (u_axes[1] ** j)[None, :, None] * (u_axes[2] ** k)[None, None, :]
    bias = np.exp(logb, out=logb)
    corrected = np.where(mask, img / bias, 0).astype(np.float32)
    return (
        {"preprocessed": (corrected, aff)},
        f"polynomial degree 3 (20 terms), lstsq on {int(mask.sum()):,} in-mask voxels x {n_iter} iterations, "
        f"bias {float(bias[mask].min()):.2f}..{float(bias[mask].max()):.2f}",
    )


def ref_kmeans(cache: Cache, a) -> tuple[dict, str]:
    from sklearn.cluster import KMeans

    img, aff = a.inputs["preprocessed"]
    mask = a.inputs["mask_ws"][0] > 0
    v = img[mask].reshape(-1, 1)
    out, iters = {}, []
    for k in KS:
        km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(v)
        rank = np.empty(k, np.uint8)
        rank[np.argsort(km.cluster_centers_[:, 0])] = np.arange(1, k + 1)
        m = np.zeros(img.shape, np.uint8)
        m[mask] = rank[km.labels_]
        out[f"kmeans_k{k}"] = (m, aff)
        iters.append(int(km.n_iter_))
    return out, f"sklearn KMeans n_init=1 on {len(v):,} in-mask values, k=4..9, Lloyd iterations {iters}"


def _ball(radius_mm: float, spacing) -> np.ndarray:
    h = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    g = np.ogrid[tuple(slice(-n, n + 1) for n in h)]
    return sum((gi * s) ** 2 for gi, s in zip(g, spacing)) <= radius_mm**2 + 1e-9


def ref_merge(cache: Cache, a) -> tuple[dict, str]:
    from scipy import ndimage as ndi

    lab, aff = a.inputs["hyp_ws"]
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    se = _ball(CLOSING_RADIUS_MM, spacing)
    pad = [(n // 2, n // 2) for n in se.shape]
    closed = ndi.binary_closing(np.pad(lab > 0, pad), structure=se)[tuple(slice(p, -p or None) for p, _ in pad)]
    idx = ndi.distance_transform_edt(lab == 0, sampling=spacing, return_distances=False, return_indices=True)
    closed_labels = np.where(closed, lab[tuple(idx)], 0).astype(np.uint16)
    del idx, closed
    out = {}
    for k in KS:
        km = a.inputs[f"kmeans_k{k}"][0]
        out[f"hemi_k{k}"] = (np.where(closed_labels > 0, closed_labels, km).astype(np.uint16), aff)
    added = int((closed_labels > 0).sum() - (lab > 0).sum())
    return out, (
        f"binary_closing {se.shape} ball ({int(se.sum())} voxels) + nearest code (EDT), +{added} voxels; six merges"
    )


def _whole_brain_grid(mask: np.ndarray, aff: np.ndarray, T: np.ndarray, s: float, margin: float):
    """Axis-aligned RAS+ grid covering T(hemisphere bbox), its mirror and a margin; x centres symmetric about 0."""
    lo_hi = []
    for d in range(3):
        nz = np.flatnonzero(mask.any(axis=tuple(e for e in range(3) if e != d)))
        lo_hi.append((nz[0] - 0.5, nz[-1] + 0.5))
    corners = np.array([[i, j, k, 1.0] for i in lo_hi[0] for j in lo_hi[1] for k in lo_hi[2]])
    w = (corners @ (T @ aff).T)[:, :3]
    lo, hi = w.min(axis=0), w.max(axis=0)
    nx = 2 * max(1, int(np.ceil((max(-lo[0], hi[0], 0.0) + margin) / s - 1e-9)))
    shape, origin = [nx], [(0.5 - nx / 2) * s]
    for d in (1, 2):
        o = np.floor((lo[d] - margin) / s + 1e-9) * s
        shape.append(int(np.ceil((hi[d] + margin - o) / s - 1e-9)) + 1)
        origin.append(o)
    out = np.diag([s, s, s, 1.0])
    out[:3, 3] = origin
    return tuple(shape), out


def ref_mirror(cache: Cache, a) -> tuple[dict, str]:
    from scipy import ndimage as ndi

    mask, aff = a.inputs["mask_ws"]
    T = cache.affine("mirror_transform")  # world -> world with the medial plane at x = 0 (set by the parent)
    s = float(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)).min())
    shape, out_aff = _whole_brain_grid(mask > 0, aff, T, s, MARGIN_MM)
    g = np.linalg.inv(aff) @ np.linalg.inv(T) @ out_aff
    lut = np.arange(65536, dtype=np.uint16)
    for left, right in RIGHT_CODES.items():
        lut[left] = right
    half = shape[0] // 2
    outs = {}
    for k in KS:
        full = ndi.affine_transform(
            a.inputs[f"hemi_k{k}"][0],
            g[:3, :3],
            offset=g[:3, 3],
            output_shape=shape,
            order=0,
            mode="grid-constant",
            cval=0,
        )
        full[half:] = lut[full[:half][::-1]]
        outs[k] = full  # all six held, as a script writing them out at the end would
    return {}, f"affine_transform order 0 onto {shape} ({np.prod(shape):,} voxels) x 6"


# ----------------------------------------------------------------------------------------------------------
# published-mirror: the authors' plane fit and mesh, in memory, on one merged map (issue 21)
# ----------------------------------------------------------------------------------------------------------

#: The defaults of the published command line (hsynex, label_maps/mirror_img.py: --alpha, --margin).
PUBLISHED_ALPHA = 5e-4
PUBLISHED_MARGIN_MM = 10.0
PUBLISHED_MAXITER = 500  # label_maps/rotation.py: scipy.optimize.fmin(..., maxiter=500), other defaults
MIRROR_K = 6  # the one map compared (its merged map hemi_k6; the published fit uses its first map's voxels)


def published_transform(params, aff, cx, cy, cz, i, j, k) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates (4 x N) of voxels (i, j, k) and the moved affine under six rigid parameters.

    Follows hsynex ``label_maps/utils_mirror.py``, ``transform()``: rotations in degrees about x, y, z
    (``Rz @ Ry @ Rx``) about the integer centre ``(cx, cy, cz)`` mm, then the translation; the 4 x N
    homogeneous index matrix is rebuilt on every call, as there (its cost is part of the method's).
    """
    rx, ry, rz = (float(p) / 180 * np.pi for p in params[:3])
    tx, ty, tz = params[3], params[4], params[5]
    t_in = np.array([[1, 0, 0, -cx], [0, 1, 0, -cy], [0, 0, 1, -cz], [0, 0, 0, 1]], dtype=float)
    rot_x = np.array([[1, 0, 0, 0], [0, np.cos(rx), -np.sin(rx), 0], [0, np.sin(rx), np.cos(rx), 0], [0, 0, 0, 1]])
    rot_y = np.array([[np.cos(ry), 0, np.sin(ry), 0], [0, 1, 0, 0], [-np.sin(ry), 0, np.cos(ry), 0], [0, 0, 0, 1]])
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0, 0], [np.sin(rz), np.cos(rz), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    t_out = np.array([[1, 0, 0, cx + tx], [0, 1, 0, cy + ty], [0, 0, 1, cz + tz], [0, 0, 0, 1]], dtype=float)
    aff_new = t_out @ rot_z @ rot_y @ rot_x @ t_in @ aff
    mtx = np.concatenate((i.reshape(1, -1), j.reshape(1, -1), k.reshape(1, -1), np.ones((1, len(i)))), axis=0)
    return aff_new @ mtx, aff_new


def published_cost(params, aff, cx, cy, cz, i, j, k, alpha) -> float:
    """``sum(x[x > 0]) - alpha * sum(x)`` of the voxels' world x after the six parameters.

    Follows hsynex ``label_maps/utils_mirror.py``, ``cost_fun()`` (the same C(T) as
    :func:`helm_dask.mirror.mirror_cost`, which helm-dask evaluates on the brain mask's voxels).

    Examples
    --------
    >>> i, j, k = np.array([0, 1, 2, 3]), np.zeros(4), np.zeros(4)     # x = -2, -1, 0, 1 (centre 2, 0, 0)
    >>> aff = np.eye(4); aff[0, 3] = -2.0
    >>> published_cost([0] * 6, aff, 0, 0, 0, i, j, k, 0.1)            # 1 - 0.1 * (-2)
    1.2
    """
    ras, _ = published_transform(params, aff, cx, cy, cz, i, j, k)
    x = ras[0, :]
    return float(x[x > 0].sum() - alpha * x.sum())


def published_fit(img: np.ndarray, aff: np.ndarray, alpha: float = PUBLISHED_ALPHA) -> dict:
    """The published plane fit of one map: Nelder-Mead (``scipy.optimize.fmin``) over six rigid parameters.

    Follows hsynex ``label_maps/rotation.py``, ``rotation()``: the map as float64 (``get_fdata``), its nonzero
    voxels (``np.argwhere``), the centre at their median voxel mapped to world mm and rounded to integers,
    ``fmin(cost_fun, x0=[0] * 6, ..., maxiter=500)`` with fmin's other defaults (xtol = ftol = 1e-4, maxfun =
    200 x 6). Deviations: ``disp=False`` and ``full_output=True`` (no printing; the iteration counts are
    reported), which change nothing in the search.
    """
    from scipy.optimize import fmin

    img_ = np.asarray(img, dtype=np.float64)  # nibabel's get_fdata
    coord = np.argwhere(img_ != 0)
    i, j, k = coord[:, 0], coord[:, 1], coord[:, 2]
    ci, cj, ck = np.median(i), np.median(j), np.median(k)
    aux = aff @ np.array([ci, cj, ck, 1]).reshape(4, 1)
    cx, cy, cz = int(np.round(aux[0, 0])), int(np.round(aux[1, 0])), int(np.round(aux[2, 0]))
    args = (aff, cx, cy, cz, i, j, k, alpha)
    xopt, fopt, n_iter, n_calls, warnflag = fmin(
        published_cost, x0=[0, 0, 0, 0, 0, 0], args=args, maxiter=PUBLISHED_MAXITER, full_output=True, disp=False
    )
    _ras, aff_new = published_transform(xopt, aff, cx, cy, cz, i, j, k)
    del _ras
    return {
        "params": [float(p) for p in xopt],
        "fopt": float(fopt),
        "iterations": int(n_iter),
        "funcalls": int(n_calls),
        "warnflag": int(warnflag),
        "centre_mm": [cx, cy, cz],
        "n_voxels": int(len(i)),
        "aff_new": aff_new.tolist(),
        "matrix": (aff_new @ np.linalg.inv(aff)).tolist(),  # world -> world: the plane is x = 0 after it
    }


def published_corners(img: np.ndarray, aff: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """The whole-brain box: hsynex ``label_maps/utils_mirror.py``, ``find_corners()`` (world mm; x symmetric)."""
    coord = np.argwhere(img > 0)
    coord_h = np.concatenate((coord, np.ones((coord.shape[0], 1))), axis=1).T
    ras = aff @ coord_h
    min_ras, max_ras = ras.min(axis=1)[:-1], ras.max(axis=1)[:-1]
    return min_ras - margin, np.array([-min_ras[0], max_ras[1], max_ras[2]]) + margin


def published_side(img, aff, corner1, corner2, res: float, left: bool) -> np.ndarray:
    """One half of the whole-brain grid sampled from ``img``: hsynex ``label_maps/utils_mirror.py``, ``mesh_sides()``.

    Every output voxel's index in ``img`` by ``inv(aff) @ grid affine``, truncated to integers (``astype(int)``,
    towards zero, not rounded), clipped to the volume, then read with a linear ``RegularGridInterpolator`` at
    those integer points (so the values themselves). The half is the x < 0 columns (``left``) or the others.
    Deviation: the unused ``np.zeros`` buffer of the full grid is not allocated (only its shape is used;
    untouched zeros pages cost no memory either).
    """
    from scipy.interpolate import RegularGridInterpolator

    size = np.ceil((corner2 - corner1) / res).astype(int)
    img_affine = np.array([[res, 0, 0, corner1[0]], [0, res, 0, corner1[1]], [0, 0, res, corner1[2]], [0, 0, 0, 1]])
    idx = int(np.floor(-(corner1[0] / res)))
    iv = np.arange(idx + 1) if left else np.arange(idx + 1, size[0])
    i, j, k = np.meshgrid(iv, np.arange(size[1]), np.arange(size[2]), indexing="ij")
    irav, jrav, krav = i.ravel(), j.ravel(), k.ravel()
    ijk = np.stack([irav, jrav, krav, np.ones(irav.shape)])
    ijk = ((np.linalg.inv(aff) @ img_affine) @ ijk).astype(int)
    i, j, k = ijk[0, :], ijk[1, :], ijk[2, :]
    for d, v in enumerate((i, j, k)):
        v[v < 0] = 0
        v[v > img.shape[d] - 1] = img.shape[d] - 1
    fn = RegularGridInterpolator(tuple(np.arange(n) for n in img.shape), img)
    interp = fn(np.array([i, j, k]).T)
    return interp.reshape((len(iv), size[1], size[2]))


def published_mesh(img: np.ndarray, aff_new: np.ndarray, k: int, margin: float, res: float):
    """The whole-brain map of one k: hsynex ``label_maps/mesh.py``, ``mesh()``, in memory (no file written).

    The hemisphere (affine ``aff_new``, codes above ``k`` raised by the map's maximum, as there) fills the x < 0
    half, the same map under the affine with its x row negated (``aff_neg`` of ``rotation()``) the other half;
    float64 throughout, as ``get_fdata`` gives. Returns the map and its affine.
    """
    img_left = np.asarray(img, dtype=np.float64)
    max_val = img_left.max()
    img_left[img_left > k] = img_left[img_left > k] + max_val
    corner1, corner2 = published_corners(img_left, aff_new, margin)
    left = published_side(img_left, aff_new, corner1, corner2, res, True)
    img_right = np.asarray(img, dtype=np.float64)
    aff_neg = aff_new.copy()
    aff_neg[0] = -aff_neg[0]
    right = published_side(img_right, aff_neg, corner1, corner2, res, False)
    out_aff = np.array([[res, 0, 0, corner1[0]], [0, res, 0, corner1[1]], [0, 0, res, corner1[2]], [0, 0, 0, 1]])
    mirrored = np.zeros((left.shape[0] + right.shape[0], left.shape[1], left.shape[2]))
    mirrored[: left.shape[0]] = left
    mirrored[left.shape[0] :] = right
    return mirrored, out_aff


def ref_published_mirror(cache: Cache, a) -> tuple[dict, str, dict]:
    """The published method on one merged map: plane fit (``rotation()``) then mesh (``mesh()``), held in memory."""
    img, aff = a.inputs[f"hemi_k{MIRROR_K}"]
    t0 = time.perf_counter()
    fit = published_fit(img, aff)
    t_fit = time.perf_counter() - t0
    res = float(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)).min())  # --res: the map's own spacing (0.3 at 0.3 mm)
    mirrored, _out_aff = published_mesh(img, np.array(fit["aff_new"]), MIRROR_K, PUBLISHED_MARGIN_MM, res)
    fit.update(fit_s=t_fit, mesh_s=time.perf_counter() - t0 - t_fit, mesh_shape=list(mirrored.shape))
    detail = (
        f"published fit: fmin {fit['iterations']} iterations, {fit['funcalls']} cost calls (warnflag "
        f"{fit['warnflag']}) on {fit['n_voxels']:,} voxels in {t_fit:.1f} s; mesh {mirrored.shape} "
        f"({mirrored.size:,} float64 voxels) in {fit['mesh_s']:.1f} s"
    )
    return {}, detail, {"published": fit}


REFERENCES = {
    "orient": ref_orient,
    "background": ref_background,
    "resample": ref_resample,
    "bias": ref_bias,
    "kmeans": ref_kmeans,
    "merge": ref_merge,
    "mirror": ref_mirror,
    "published-mirror": ref_published_mirror,
}


def _proc(field: str) -> int:
    """A number from /proc/self/status (kB -> bytes) or /proc/self/io."""
    if field in ("rchar", "wchar"):
        for line in open("/proc/self/io"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(a) -> int:
    """Run one stage's reference in this (fresh) process; write the measurement to RESULT_FILE."""
    import nibabel  # noqa: F401  (libraries imported before the baseline, as any script would)
    import scipy.ndimage

    if a.child == "kmeans":
        import sklearn.cluster  # noqa: F401
    if a.child == "published-mirror":
        import scipy.interpolate
        import scipy.optimize  # noqa: F401
    if a.child == "helm-mirror":
        return helm_child(a)
    cache = Cache(a.cache, a.spacing == "native")
    base = _proc("VmRSS")
    io0 = _proc("rchar"), _proc("wchar")
    t0 = time.perf_counter()
    a.inputs = {name: cache.load(name) for name in stage_inputs(a.child)}
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs, detail, *extra = REFERENCES[a.child](cache, a)
    wall = time.perf_counter() - t1
    if a.child == "orient":  # reading the files is this stage's work
        wall, load_s = wall + load_s, 0.0
    result = {
        "wall_s": wall,
        "load_s": load_s,
        "peak_bytes": _proc("VmHWM"),
        "base_bytes": base,
        "read_bytes": _proc("rchar") - io0[0],
        "written_bytes": _proc("wchar") - io0[1],
        "detail": detail,
        **(extra[0] if extra else {}),
    }
    a.inputs = None
    for name, (arr, aff) in outputs.items():  # handed to the next stage (unmeasured)
        cache.save(name, arr, aff)
    Path(a.result_file).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------------
# the parent: sizes, prediction, one subprocess per stage, rows
# ----------------------------------------------------------------------------------------------------------


def grid_sizes(input_spacing: float, spacing) -> tuple[int, int]:
    """(input voxels, working-grid voxels) of the phantom (the grid of its NIfTI files; nothing computed)."""
    from helm_dask.phantom import phantom_geometry

    g = phantom_geometry(input_spacing, "L")
    shape, aff = g["shape"], g["affine"]
    if spacing == "native":
        return int(np.prod(shape)), int(np.prod(shape))
    new, _ = work_grid(shape, aff, float(spacing))
    return int(np.prod(shape)), int(np.prod(new))


def stage_voxels(stage: str, n_in: int, n_ws: int) -> int:
    return {"orient": n_in, "background": n_in, "resample": n_in + n_ws}.get(stage, n_ws)


def load_model(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def does_not_fit(pred: float, ref: dict, n: int, max_bytes: float) -> str:
    stops = (max_bytes - ref["base_mb"] * 2**20) / ref["bytes_per_voxel"]
    return (
        f"does not fit: predicted {pred / GIB:.1f} GB at {n:,} voxels; stops at ~{stops / 1e6:,.0f} M voxels "
        f"({ref['bytes_per_voxel']:.1f} B/voxel + {ref['base_mb']} MB measured at {ref['n']:,} voxels; limit "
        f"{max_bytes / GIB:g} GB)"
    )


def predict(stage: str, n: int, model: dict) -> tuple[float, dict] | None:
    """Predicted peak bytes at N voxels from the measurement at the largest size below N (else the defaults)."""
    meas = [m for m in model.get(stage, []) if m["n"] <= n]
    ref = max(meas, key=lambda m: (m["n"], m["bytes_per_voxel"])) if meas else DEFAULT_MODEL.get(stage)
    if ref is None:
        return None
    return ref["base_mb"] * 2**20 + ref["bytes_per_voxel"] * n, ref


def record(path: Path, stage: str, n: int, base: int, peak: int, spacing, ws) -> float:
    model = load_model(path)
    bpv = (peak - base) / n
    entries = [m for m in model.get(stage, []) if m["n"] != n]
    entries.append(
        {
            "n": n,
            "base_mb": round(base / 2**20),
            "peak_mb": round(peak / 2**20),
            "bytes_per_voxel": round(bpv, 2),
            "input_spacing": spacing,
            "work_spacing": ws,
        }
    )
    model[stage] = sorted(entries, key=lambda m: m["n"])
    path.write_text(json.dumps(model, indent=1))
    return bpv


def materialise_from_pipeline(cache: Cache, name: str, run_dir: Path) -> bool:
    """Stream helm-dask's own output of the same run into <cache>/<name>.npy (bounded memory), if it exists."""
    src = run_dir / "bench" / "helm.zarr" / PIPELINE_NAMES.get(name, "?")
    if name not in PIPELINE_NAMES or not src.exists():
        return False
    from helm_dask.io.store import open_volume

    _stream_to_cache(cache, name, open_volume(str(src)))
    return True


def _stream_to_cache(cache: Cache, name: str, vol) -> None:
    """Stream a lazy volume into <cache>/<name>.npy (a memmap; renamed into place when complete)."""
    import dask.array as da

    from helm_dask.volume import affine_of

    tmp = cache.root / f".{name}.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=vol.dtype, shape=vol.shape)
    da.store(vol.data, out, lock=False)
    out.flush()
    del out
    os.replace(tmp, cache.path(name))
    cache.set_affine(name, affine_of(vol))


#: RAS+ intermediates the phantom itself can give (the same voxels as its NIfTI files; the true brain mask).
PHANTOM_NAMES = {"scan_ras": "scan", "hyp_ras": "hypothalamus", "mask_ras": "truth_mask"}


def materialise_from_phantom(cache: Cache, name: str, input_spacing: float) -> None:
    """<cache>/<name>.npy from the lazy phantom, reoriented to RAS+ and streamed (bounded memory; unmeasured)."""
    from helm_dask.orient import to_ras
    from helm_dask.phantom import phantom

    vol = to_ras(phantom(input_spacing, side="L", seed=0, chunks=(256, 256, 16))[PHANTOM_NAMES[name]])
    _stream_to_cache(cache, name, vol)


def dice(p: Path, q: Path, slab: int = 64) -> float:
    """Dice of two 0/1 .npy volumes, read in slabs (bounded memory)."""
    a, b = np.load(p, mmap_mode="r"), np.load(q, mmap_mode="r")
    inter = total = 0
    for i in range(0, a.shape[0], slab):
        x, y = np.asarray(a[i : i + slab]) > 0, np.asarray(b[i : i + slab]) > 0
        inter += int(np.count_nonzero(x & y))
        total += int(np.count_nonzero(x)) + int(np.count_nonzero(y))
    return 2 * inter / max(total, 1)


def results_path() -> Path:
    from harness import RESULTS

    env = os.environ.get("HELM_BENCH_RESULTS")
    return Path(env) if env else RESULTS


def run_child(argv: list[str], max_bytes: float) -> tuple[int, int, bool]:
    """Run the child, polling its RSS every 0.1 s; kill it past max_bytes. Returns (rc, sampled peak, killed)."""
    import psutil

    p = subprocess.Popen(argv)
    proc, peak, killed = psutil.Process(p.pid), 0, False
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        if rss > max_bytes and not killed:
            p.kill()
            killed = True
        time.sleep(0.1)
    return p.returncode, peak, killed


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-spacing", type=float, required=True)
    ap.add_argument("--spacing", default="0.3", help="working spacing in mm, or native")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--max-gb", type=float, default=20.0, help="do not run (or kill) a stage above this peak (GiB)")
    ap.add_argument("--dry-run", action="store_true", help="print each stage's predicted peak and exit")
    ap.add_argument("--keep-cache", action="store_true", help="keep the .npy intermediates in WORKDIR")
    ap.add_argument("--note", default="")
    # internal: the child process
    ap.add_argument(
        "--published-mirror",
        action="store_true",
        help=f"instead of the stages: the published plane fit + mesh vs helm-dask's mirror stage on one map "
        f"(k = {MIRROR_K}), each in its own process",
    )
    ap.add_argument(
        "--helm-only",
        action="store_true",
        help="with --published-mirror: helm-dask's side only (e.g. after a change to the mirror stage; the "
        "published side, ~15 min and 22 GB, does not change with helm-dask's code)",
    )
    ap.add_argument("--child", choices=(*STAGES, "published-mirror", "helm-mirror"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--hyp", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.spacing != "native":
        a.spacing = f"{float(a.spacing):g}"
    return a


def dry_run(a, todo: list[str], n_in: int, n_ws: int, model_path: Path, max_bytes: float) -> int:
    """Print each stage's predicted peak (nothing is run)."""
    print(f"input {a.input_spacing:g} mm ({n_in:,} voxels), working grid {a.spacing} ({n_ws:,} voxels):")
    for stage in todo:
        n = stage_voxels(stage, n_in, n_ws)
        pred = predict(stage, n, load_model(model_path))
        if pred is None:
            print(f"  {stage:10s} no measurement")
        elif pred[0] > max_bytes:
            print(f"  {stage:10s} {does_not_fit(pred[0], pred[1], n, max_bytes)}")
        else:
            print(
                f"  {stage:10s} predicted {pred[0] / GIB:.2f} GB at {n:,} voxels "
                f"({pred[1]['bytes_per_voxel']:.1f} B/voxel measured at {pred[1]['n']:,})"
            )
    return 0


class Session:
    """What every stage of one parent run shares: arguments, sizes, the cache, where inputs and rows go."""

    def __init__(self, a, n_in: int, n_ws: int):
        from pipeline import ensure_inputs

        from helm_dask.phantom import phantom_geometry

        self.a, self.n_in, self.n_ws = a, n_in, n_ws
        self.work = Path(a.workdir)
        self.native = a.spacing == "native"
        self.model_path = self.work / "reference_memory.json"
        self.max_bytes = a.max_gb * GIB
        self.work.mkdir(parents=True, exist_ok=True)
        self.scan, self.hyp, _ = ensure_inputs(self.work, a.input_spacing)  # the phantom's NIfTI pair (unmeasured)
        self.cache = Cache(self.work / f"reference_{a.input_spacing:g}mm_{a.spacing}", self.native)
        # the mirror reference uses the phantom's true medial plane: T = world -> object frame (medial face X = 0)
        self.cache.set_affine(
            "mirror_transform", np.linalg.inv(phantom_geometry(a.input_spacing, "L")["object_to_world"])
        )
        self.run_dir = self.work / f"run_{a.input_spacing:g}_{a.spacing}"
        self.out_csv = results_path()
        self.common = {"spacing_mm": a.input_spacing, "work_spacing_mm": a.spacing, "voxels": n_in, "workers": 1}


def gather_inputs(s: Session, stage: str, note: list[str]) -> list[str]:
    """Put the stage's inputs in the cache (from the phantom or the pipeline's run when no reference made them).

    Returns the names that could not be found; appends to ``note`` where each input came from.
    """
    cache = s.cache
    needed = []
    for name in stage_inputs(stage):  # on the native grid the working-grid inputs are the RAS+ ones
        needed += NATIVE_ALIAS.get(name, [name]) if s.native and not cache.has(name) else [name]
    missing = []
    for name in dict.fromkeys(needed):
        if name == "mask_ras":
            note.append("mask: the phantom's true brain mask")
        if cache.has(name):
            continue
        if name in PHANTOM_NAMES:
            materialise_from_phantom(cache, name, s.a.input_spacing)
            if name != "mask_ras":
                note.append(f"input {name} generated from the phantom (the orient reference did not run)")
        elif materialise_from_pipeline(cache, name, s.run_dir):
            note.append(f"input {name} from helm-dask's pipeline output")
        else:
            missing.append(name)
    return missing


def child_argv(s: Session, stage: str, res_file: Path) -> list[str]:
    """The command line of the fresh subprocess that runs one stage's reference."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--input-spacing",
        str(s.a.input_spacing),
        "--spacing",
        s.a.spacing,
        "--child",
        stage,
        "--cache",
        str(s.cache.root),
        "--scan",
        str(s.scan),
        "--hyp",
        str(s.hyp),
        "--result-file",
        str(res_file),
    ]


def record_measured(s: Session, stage: str, n: int, grid: str, note: list[str], r: dict, sampled: int) -> None:
    """The row of a stage that ran to the end (and its bytes per voxel into the memory model)."""
    from harness import append_row

    cache, a = s.cache, s.a
    if stage == "background":
        # the plain mask is measured, not passed on (a global threshold cannot separate the fluid under
        # the phantom's bias field): later stages use the true mask, so they work on a brain-sized mask
        if not cache.has("mask_ras"):
            materialise_from_phantom(cache, "mask_ras", a.input_spacing)
        d = dice(cache.path("mask_ras_plain"), cache.path("mask_ras"))
        r["detail"] += f"; Dice {d:.3f} against the true mask (not passed on)"
        cache.path("mask_ras_plain").unlink(missing_ok=True)
    bpv = record(s.model_path, stage, n, r["base_bytes"], r["peak_bytes"], a.input_spacing, a.spacing)
    note += [
        r["detail"],
        f"stage grid {grid}; {bpv:.1f} B/voxel above a {r['base_bytes'] / 2**20:.0f} MB "
        f"interpreter" + (f"; inputs loaded in {r['load_s']:.1f} s (not timed)" if stage != "orient" else ""),
    ]
    row = dict(
        s.common,
        stage=f"reference:{stage}",
        wall_s=round(r["wall_s"], 2),
        mvox_per_s=round(s.n_in / r["wall_s"] / 1e6, 2) if r["wall_s"] > 0 else "",
        peak_rss_mb=round(r["peak_bytes"] / 2**20),
        read_mb=round(r["read_bytes"] / 2**20),
        written_mb=round(r["written_bytes"] / 2**20),
        note="; ".join(note),
    )
    append_row(row, s.out_csv)
    print(
        f"  {stage}: {r['wall_s']:.2f} s, peak {r['peak_bytes'] / 2**20:.0f} MB "
        f"(sampled {sampled / 2**20:.0f} MB), {bpv:.1f} B/voxel -- {r['detail']}",
        flush=True,
    )


def run_stage(s: Session, stage: str) -> int | None:
    """Predict, gather inputs, run one stage in a child and write its row; 1 when the child failed (not killed)."""
    from harness import append_row

    a = s.a
    n = stage_voxels(stage, s.n_in, s.n_ws)
    grid = f"{n:,} voxels" + (" (input + working grid)" if stage == "resample" else "")
    note = [a.note] if a.note else []
    pred = predict(stage, n, load_model(s.model_path))
    if pred is not None and pred[0] > s.max_bytes:
        msg = does_not_fit(pred[0], pred[1], n, s.max_bytes)
        print(f"  {stage}: {msg}", flush=True)
        append_row(dict(s.common, stage=f"reference:{stage}", note="; ".join(note + [msg])), s.out_csv)
        return None
    missing = gather_inputs(s, stage, note)
    if missing:
        msg = f"not run: inputs {missing} missing (upstream reference not run; no {s.run_dir.name} either)"
        print(f"  {stage}: {msg}", flush=True)
        return None
    res_file = s.cache.root / f"result_{stage}.json"
    res_file.unlink(missing_ok=True)
    print(
        f"  {stage}: running on {grid}" + (f", predicted peak {pred[0] / GIB:.2f} GB" if pred else ""),
        flush=True,
    )
    rc, sampled, killed = run_child(child_argv(s, stage, res_file), s.max_bytes)
    if killed or rc != 0 or not res_file.exists():
        why = f"killed: RSS passed --max-gb {a.max_gb:g} at {n:,} voxels" if killed else f"failed (exit code {rc})"
        print(f"  {stage}: {why}", flush=True)
        append_row(
            dict(
                s.common,
                stage=f"reference:{stage}",
                peak_rss_mb=round(sampled / 2**20),
                note="; ".join(note + [why]),
            ),
            s.out_csv,
        )
        return None if killed else 1
    record_measured(s, stage, n, grid, note, json.loads(res_file.read_text()), sampled)
    return None


def print_model(model_path: Path) -> None:
    model = load_model(model_path)
    print("measured bytes per voxel (peak - interpreter) / stage voxels:", flush=True)
    for stage in STAGES:
        for m in model.get(stage, []):
            print(
                f"  {stage:10s} {m['n']:>13,} voxels  {m['bytes_per_voxel']:7.1f} B/voxel  peak {m['peak_mb']:>6} MB"
                f"  (input {m['input_spacing']} mm, work {m['work_spacing']})",
                flush=True,
            )


# ----------------------------------------------------------------------------------------------------------
# published-mirror, the parent and helm-dask's side
# ----------------------------------------------------------------------------------------------------------


def helm_child(a) -> int:
    """helm-dask's mirror stage, as ``run`` does it, on a copy of a run stopped after merge (one map, k = 6).

    The stage (plane fit on the mask, hypothalamus check, the whole-brain map written to Zarr with its pyramid)
    runs on a LocalCluster of 2 workers x 1 thread started in this process; its peak is the summed RSS of this
    process tree (client, scheduler, workers) sampled every 0.1 s from the stage's start to its end, as the
    ``pipeline:<stage>`` rows measure it.
    """
    from harness import Sampler

    from helm_dask.cluster import ClusterOptions, compute_context
    from helm_dask.mirror import MirrorTransform
    from helm_dask.pipeline import RunParams, run_subject

    run = Path(a.cache) / "helm_run"
    params = RunParams(
        scan=a.scan,
        hypothalamus=a.hyp,
        out=str(run),
        side="L",
        spacing="native" if a.spacing == "native" else float(a.spacing),
        until="mirror",
        ks=(MIRROR_K,),
        subject="bench",
        qc=False,
        nifti=False,
    )
    m: dict = {}
    with Sampler() as s, compute_context(ClusterOptions(workers=2, threads_per_worker=1, quiet=True)):

        def log(msg: str) -> None:
            stage, _, rest = msg.partition(":")
            if stage == "mirror" and rest.strip().startswith("computing"):
                s.mark()
                m.update(t0=time.perf_counter(), cpu0=s.cpu_seconds)
            elif stage == "mirror" and rest.strip().startswith("done in"):
                peak, rd, wr = s.mark()
                m.update(wall_s=time.perf_counter() - m["t0"], peak_bytes=peak, read_bytes=rd, written_bytes=wr)
                m.update(cpu_s=s.cpu_seconds - m["cpu0"], breakdown=s.stage_breakdown, load=s.stage_load)

        run_subject(params, log=log)
    if "wall_s" not in m:
        raise RuntimeError("the mirror stage did not run (was it already done in the copied run?)")
    tr = MirrorTransform.from_dict(json.loads((run / "bench" / "transform.json").read_text())["transform"])
    m["matrix"] = np.asarray(tr.matrix, dtype=float).tolist()
    m["cost"] = float(tr.cost)
    Path(a.result_file).write_text(json.dumps(m))
    return 0


def _unit_plane(matrix) -> tuple[np.ndarray, float]:
    """The plane ``x = 0 after T`` of a world -> world transform as (unit normal n, offset d): ``n . v + d = 0``."""
    row = np.asarray(matrix, dtype=float)[0]
    norm = float(np.linalg.norm(row[:3]))
    return row[:3] / norm, float(row[3]) / norm


def plane_costs(zarr_dir: Path, matrices: dict, alpha: float, slab: int = 32) -> dict:
    """``C(T)`` of each plane on the map's nonzero voxels (the published fit's set) and on the brain mask's
    (helm-dask's), and the world centroid of the map's voxels; both stores streamed in slabs of ``slab`` planes.

    Returns ``{"<name>@map": C, "<name>@mask": C, "n_map": N, "n_mask": N, "centre_mm": [x, y, z]}``.
    """
    from helm_dask.io.store import open_volume
    from helm_dask.volume import affine_of

    vols = {"map": open_volume(str(zarr_dir / f"hemi_k{MIRROR_K}")), "mask": open_volume(str(zarr_dir / "mask"))}
    aff = affine_of(vols["map"])
    if not np.allclose(aff, affine_of(vols["mask"])) or vols["map"].shape != vols["mask"].shape:
        raise RuntimeError("map and mask are not on the same grid")
    sums = {(name, which): [0.0, 0.0] for name in matrices for which in vols}
    counts, centre = {"map": 0, "mask": 0}, np.zeros(3)
    for i0 in range(0, vols["map"].shape[0], slab):
        for which, vol in vols.items():
            idx = np.nonzero(np.asarray(vol.data[i0 : i0 + slab]) != 0)
            ijk = np.stack(idx, axis=1).astype(np.float64)
            ijk[:, 0] += i0
            world = ijk @ aff[:3, :3].T + aff[:3, 3]
            counts[which] += len(world)
            if which == "map":
                centre += world.sum(axis=0)
            for name, mat in matrices.items():
                x = world @ np.asarray(mat, dtype=float)[0, :3] + float(np.asarray(mat)[0, 3])
                sums[name, which][0] += float(x[x > 0].sum())
                sums[name, which][1] += float(x.sum())
    out: dict = {f"{name}@{which}": pos - alpha * tot for (name, which), (pos, tot) in sums.items()}
    out.update(n_map=counts["map"], n_mask=counts["mask"], centre_mm=(centre / max(counts["map"], 1)).tolist())
    return out


def compare_planes(zarr_dir: Path, pub: dict | None, helm: dict, input_spacing: float) -> str:
    """The note shared by the two rows: the cost each plane reaches (both cost functions), their angle and
    distance at the map's centroid, and each against the phantom's true medial plane."""
    from helm_dask.phantom import phantom_geometry

    mats = {"helm-dask": helm["matrix"]} | ({"published": pub["matrix"]} if pub else {})
    c = plane_costs(zarr_dir, mats, PUBLISHED_ALPHA)
    centre = np.array(c["centre_mm"])
    truth = phantom_geometry(input_spacing, "L")["medial_plane"]
    nt = np.asarray(truth["normal"], dtype=float)
    planes = {name: _unit_plane(m) for name, m in mats.items()} | {"truth": (nt, -float(nt @ truth["point_mm"]))}

    def angle_dist(p: str, q: str) -> tuple[float, float]:
        (n1, d1), (n2, d2) = planes[p], planes[q]
        ang = float(np.degrees(np.arccos(np.clip(n1 @ n2, -1.0, 1.0))))
        return ang, abs(float(n1 @ centre + d1) - float(n2 @ centre + d2))

    parts = [f"map {c['n_map']:,} nonzero voxels, mask {c['n_mask']:,}"]
    for name in mats:
        ang, dist = angle_dist(name, "truth")
        parts.append(
            f"{name} plane: C(T) published cost fn (map voxels) {c[f'{name}@map']:.6g}, helm-dask mirror_cost "
            f"(mask voxels) {c[f'{name}@mask']:.6g}, vs the true medial plane {ang:.3f} deg / {dist:.3f} mm"
        )
    if pub:
        ang, dist = angle_dist("published", "helm-dask")
        parts.append(f"published fopt {pub['fopt']:.6g}, helm-dask transform.json cost {helm['cost']:.6g}")
        parts.append(f"angle between the two planes {ang:.3f} deg, distance at the map centroid {dist:.3f} mm")
    return "; ".join(parts)


def prepare_k_run(s: Session, run_dir: Path) -> None:
    """``helm-dask run --until merge --k 6`` on the phantom into ``run_dir`` (unmeasured), unless already there."""
    if (run_dir / "bench" / "helm.zarr" / f"hemi_k{MIRROR_K}").exists():
        return
    exe = Path(sys.executable).parent / "helm-dask"
    cmd = [str(exe) if exe.exists() else "helm-dask", "run", str(s.scan), "--hypothalamus", str(s.hyp)]
    cmd += ["--out", str(run_dir), "--subject", "bench", "--side", "L", "--spacing", s.a.spacing, "--until", "merge"]
    cmd += ["--k", str(MIRROR_K), "--no-qc", "--no-nifti", "--workers", "2", "--threads-per-worker", "1", "--quiet"]
    print(f"  preparing the merged map (unmeasured): {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _measure_published(s: Session, note: list[str]) -> dict | None:
    """The published side in its own process, unless its predicted peak is above --max-gb (then a row says so)."""
    from harness import append_row

    n = s.n_ws
    pred = predict("published-mirror", n, load_model(s.model_path))
    if pred is not None and pred[0] > s.max_bytes:
        msg = does_not_fit(pred[0], pred[1], n, s.max_bytes)
        print(f"  published-mirror: {msg}", flush=True)
        append_row(dict(s.common, stage="reference:published-mirror", note="; ".join(note + [msg])), s.out_csv)
        return None
    res_file = s.cache.root / "result_published-mirror.json"
    res_file.unlink(missing_ok=True)
    print(f"  published-mirror: running, predicted peak {pred[0] / GIB:.2f} GB" if pred else "", flush=True)
    rc, sampled, killed = run_child(child_argv(s, "published-mirror", res_file), s.max_bytes)
    if killed or rc != 0 or not res_file.exists():
        why = f"killed: RSS passed --max-gb {s.a.max_gb:g}" if killed else f"failed (exit code {rc})"
        print(f"  published-mirror: {why}", flush=True)
        row = dict(s.common, stage="reference:published-mirror", peak_rss_mb=round(sampled / 2**20))
        append_row(dict(row, note="; ".join(note + [why])), s.out_csv)
        return None
    r = json.loads(res_file.read_text())
    r["bpv"] = record(
        s.model_path, "published-mirror", n, r["base_bytes"], r["peak_bytes"], s.a.input_spacing, s.a.spacing
    )
    return r


def run_published_mirror(s: Session) -> int:
    """One map (k = 6) of the phantom hemisphere: helm-dask's mirror stage, then the published method, each in
    a fresh process; the two rows carry the costs, the angle between the planes and the ratios."""
    from harness import append_row

    a = s.a
    s.run_dir = s.work / f"run_{a.input_spacing:g}_{a.spacing}_k{MIRROR_K}"
    prepare_k_run(s, s.run_dir)
    note = [a.note] if a.note else []
    if gather_inputs(s, "published-mirror", note):
        print(f"  published-mirror: not run, no merged map in {s.run_dir}", flush=True)
        return 1
    helm_run = s.cache.root / "helm_run"
    shutil.rmtree(helm_run, ignore_errors=True)
    shutil.copytree(s.run_dir, helm_run)  # the stage writes its outputs there (unmeasured copy)
    res_file = s.cache.root / "result_helm-mirror.json"
    print("  helm-dask mirror stage (one map): running", flush=True)
    rc, _sampled, _killed = run_child(child_argv(s, "helm-mirror", res_file), s.max_bytes)
    if rc != 0 or not res_file.exists():
        print(f"  helm-dask mirror stage failed (exit code {rc})", flush=True)
        return 1
    helm = json.loads(res_file.read_text())
    pub = None if a.helm_only else _measure_published(s, note)
    shared = compare_planes(s.run_dir / "bench" / "helm.zarr", pub["published"] if pub else None, helm, a.input_spacing)
    if pub:
        rt, rm = pub["wall_s"] / helm["wall_s"], pub["peak_bytes"] / helm["peak_bytes"]
        shared += f"; published / helm-dask: time {rt:.1f}x, memory {rm:.1f}x (targets >= 30x, >= 15x)"
    print(f"  {shared}", flush=True)
    mib = 2**20
    helm_note = (
        f"helm-dask mirror stage on one map (k {MIRROR_K}): plane fit + hypothalamus check + whole-brain map "
        f"(Zarr + pyramid), 2 workers x 1 thread, {helm['cpu_s']:.1f} CPU s; peak = summed RSS of the process tree "
        f"({helm['breakdown']}); stage load {helm['load']:.1f}"
    )
    row = dict(s.common, stage="pipeline:mirror-one-map", workers=2, threads_per_worker=1)
    row.update(wall_s=round(helm["wall_s"], 2), peak_rss_mb=round(helm["peak_bytes"] / 2**20))
    row.update(read_mb=round(helm["read_bytes"] / 2**20), written_mb=round(helm["written_bytes"] / 2**20))
    append_row(dict(row, note="; ".join(note + [helm_note, shared])), s.out_csv)
    print(f"  helm-dask: {helm['wall_s']:.1f} s, peak {helm['peak_bytes'] / mib:.0f} MB", flush=True)
    if pub:
        pub_note = f"{pub['detail']}; peak = the child's VmHWM, {pub['bpv']:.1f} B/map voxel above the interpreter"
        row = dict(s.common, stage="reference:published-mirror", wall_s=round(pub["wall_s"], 2))
        row.update(peak_rss_mb=round(pub["peak_bytes"] / 2**20), read_mb=round(pub["read_bytes"] / 2**20))
        row.update(written_mb=round(pub["written_bytes"] / 2**20))
        append_row(dict(row, note="; ".join(note + [pub_note, shared])), s.out_csv)
        print(f"  published: {pub['wall_s']:.1f} s, peak {pub['peak_bytes'] / mib:.0f} MB", flush=True)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        return child(a)
    n_in, n_ws = grid_sizes(a.input_spacing, a.spacing)
    native = a.spacing == "native"
    todo = [s for s in STAGES if s in a.stages and not (s == "resample" and native)]
    if a.dry_run:
        return dry_run(a, todo, n_in, n_ws, Path(a.workdir) / "reference_memory.json", a.max_gb * GIB)
    s = Session(a, n_in, n_ws)
    if a.published_mirror:
        try:
            return run_published_mirror(s)
        finally:
            if not a.keep_cache:
                shutil.rmtree(s.cache.root, ignore_errors=True)
    print(
        f"reference: input {a.input_spacing:g} mm ({n_in:,} voxels), working grid {a.spacing} ({n_ws:,} voxels),"
        f" rows -> {s.out_csv}",
        flush=True,
    )
    if native and "resample" in a.stages:
        print("  resample: skipped (native working grid)", flush=True)
    try:
        for stage in todo:
            if run_stage(s, stage) is not None:
                return 1
    finally:
        if not a.keep_cache:
            shutil.rmtree(s.cache.root, ignore_errors=True)
    print_model(s.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
