"""Stage 1, orientation: every subject becomes a left hemisphere in RAS+ voxel order, exactly and lazily --
:func:`to_ras` reorients by axis flips and permutations, :func:`flip_left_right` mirrors a right hemisphere
about the world plane x = 0, :func:`map_right_to_left_codes` gives its labels the left codes,
:func:`detect_side` tells left from right by where the hypothalamus lies, :func:`check_same_grid` refuses a
scan and labels on different grids, and :func:`orient_subject` chains it all for one subject. The method is
described in ``docs/method/orientation.md``.
"""

from __future__ import annotations

import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from numba import njit

from .arrays import as_dask
from .errors import HelmError
from .io.regions import carry_view, chunk_tasks
from .labels import RIGHT_OFFSET, RIGHT_TO_LEFT, SIDE_CODES
from .volume import affine_of, like, orientation_code, provenance_record, spacing_of, voxel_to_world

__all__ = [
    "RIGHT_TO_LEFT",
    "SIDE_MIN_STRENGTH",
    "check_same_grid",
    "check_side",
    "detect_side",
    "flip_left_right",
    "map_right_to_left_codes",
    "orient_subject",
    "ras_grid",
    "require_clear_side",
    "to_ras",
]

_RIGHT = SIDE_CODES["R"]

#: Smallest side-decision strength (``|hypothalamus x - brain x| / brain half-width``, see
#: :func:`detect_side`) taken as a decision. A hemisphere whose header matches its anatomy has its
#: hypothalamus on the medial face, about 0.5-0.8 brain half-widths from the brain's centroid (the HELM phantom:
#: 0.57); a header 60-90 degrees off about z, or 90 about y, brings it to 0.07-0.13 on the phantom (30 about z:
#: 0.27), a hypothalamus at the brain's centre to 0. Below this, ``--side auto`` refuses to guess
#: (:func:`require_clear_side`).
SIDE_MIN_STRENGTH = 0.2


# ----------------------------------------------------------------------------------------------------------
# reorientation
# ----------------------------------------------------------------------------------------------------------


def _ras_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (per input axis: output axis, flip) taking the voxel axes to the closest RAS+."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise HelmError(
            "the affine is degenerate (a voxel axis has no direction); cannot reorient to RAS+",
            hint="check the sform/qform of the input file",
        )
    return ornt


def ras_grid(shape: tuple[int, ...], affine: Any) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the grid :func:`to_ras` would produce (no data touched).

    Parameters
    ----------
    shape : tuple of int
        The volume's shape (the first three entries are used).
    affine : array-like, 4x4
        Its affine.

    Returns
    -------
    shape : tuple of three ints
    affine : numpy.ndarray
        4x4 float64.

    Example
    -------
    >>> ras_grid((4, 5, 6), np.diag([-1.0, 1, 1, 1]))[1][0].tolist()
    [1.0, 0.0, 0.0, -3.0]
    """
    import nibabel as nib

    a = np.asarray(affine, dtype=np.float64)
    ornt = _ras_ornt(a)
    shape3 = tuple(int(n) for n in shape[:3])
    new_affine = a @ nib.orientations.inv_ornt_aff(ornt, shape3)
    perm = np.argsort(ornt[:, 0])
    return tuple(shape3[p] for p in perm), new_affine


def to_ras(vol: xr.DataArray) -> xr.DataArray:
    """Reorient a volume to the closest RAS+ voxel order by axis flips and permutations only.

    Lazy (dask ``[::-1]`` slicing and ``transpose``); no interpolation, so values are bit-identical. The
    affine becomes ``affine @ inv_ornt_aff(ornt, shape)`` (nibabel's ``as_closest_canonical``), which keeps
    the world position of every voxel centre exactly. An oblique affine stays (slightly) oblique. A trailing
    ``echo`` dim, if present, is left alone. A volume read from a store stays recognised as stored (its
    :class:`~helm_dask.io.regions.StoredSource` records the flips and the transpose).

    Parameters
    ----------
    vol : xarray.DataArray
        A volume (3-D, or 4-D with ``echo`` last).

    Returns
    -------
    xarray.DataArray
        The reoriented volume, with an ``orient.to_ras`` provenance step.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume, affine_of
    >>> v = make_volume(da.arange(6).reshape(1, 2, 3), np.diag([1.0, -1.0, 1.0, 1.0]))
    >>> to_ras(v).values[0].tolist(), float(affine_of(to_ras(v))[1, 3])
    ([[3, 4, 5], [0, 1, 2]], -1.0)
    """
    a = affine_of(vol)
    ornt = _ras_ornt(a)
    code_in = orientation_code(a)
    shape_out, new_affine = ras_grid(vol.shape, a)
    source = data = vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)
    # flips first, in input axis order, then the transpose -- the order nibabel's apply_orientation uses
    flips = tuple(slice(None, None, -1) if f < 0 else slice(None) for f in ornt[:, 1])
    data = data[flips]
    perm = [int(p) for p in np.argsort(ornt[:, 0])] + list(range(3, data.ndim))
    if perm != list(range(data.ndim)):
        data = data.transpose(perm)
    # a stored scan stays readable box by box from its store (region tasks: resampling, export)
    carry_view(data, source, [bool(f < 0) for f in ornt[:, 1]], perm)
    step = provenance_record(
        "orient.to_ras",
        {
            "orientation_in": code_in,
            "axis_order": perm[:3],
            "flipped_input_axes": [int(i) for i in np.nonzero(ornt[:, 1] < 0)[0]],
        },
    )
    return like(vol, data, affine=new_affine, step=step)


def _lr_axis(affine: np.ndarray) -> int:
    """The voxel axis that points most along world x (axis 0 for an RAS+ volume)."""
    return int(np.argmax(np.abs(affine[0, :3])))


def flip_left_right(vol: xr.DataArray) -> xr.DataArray:
    """Mirror a volume about the world plane x = 0 (world x -> -x), keeping its orientation code.

    The value at world (x, y, z) in the input is the value at (-x, y, z) in the output. Implemented as a
    reversal of the voxel axis that points along world x (axis 0 for RAS+) together with the affine

        new_affine = diag(-1, 1, 1, 1) @ affine @ F,   F = voxel flip of that axis (i -> n - 1 - i),

    so an RAS+ input gives an RAS+ output, and a scan and its labels flipped alike stay registered. Lazy; a
    volume read from a store stays recognised as stored.

    Parameters
    ----------
    vol : xarray.DataArray
        A volume.

    Returns
    -------
    xarray.DataArray
        The mirrored volume, with an ``orient.flip_left_right`` provenance step.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume, affine_of
    >>> v = make_volume(da.arange(3).reshape(3, 1, 1), np.diag([1.0, 1, 1, 1]))   # x = 0, 1, 2 mm
    >>> f = flip_left_right(v)
    >>> f.values.ravel().tolist(), float(affine_of(f)[0, 3])  # x = -2, -1, 0 mm
    ([2, 1, 0], -2.0)
    """
    a = affine_of(vol)
    ax = _lr_axis(a)
    n = vol.shape[ax]
    flip = np.eye(4)
    flip[ax, ax] = -1.0
    flip[ax, 3] = n - 1
    new_affine = np.diag([-1.0, 1.0, 1.0, 1.0]) @ a @ flip
    source = data = vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)
    index = [slice(None)] * data.ndim
    index[ax] = slice(None, None, -1)
    data = data[tuple(index)]
    carry_view(data, source, [d == ax for d in range(3)], [0, 1, 2])
    return like(
        vol,
        data,
        affine=new_affine,
        step=provenance_record("orient.flip_left_right", {"mirror_plane": "world x = 0", "voxel_axis": ax}),
    )


def _map_codes_block(block: np.ndarray) -> np.ndarray:
    out = block.copy()
    sel = (block >= min(_RIGHT)) & (block <= max(_RIGHT))
    out[sel] = block[sel] - RIGHT_OFFSET  # 806..810 -> 801..805 (RIGHT_TO_LEFT), in the block's own dtype
    return out


def map_right_to_left_codes(labels_vol: xr.DataArray) -> xr.DataArray:
    """Replace the right hypothalamus codes 806-810 by the left ones 801-805 (:data:`RIGHT_TO_LEFT`); lazy.

    Other values and the dtype are unchanged.

    Parameters
    ----------
    labels_vol : xarray.DataArray
        A label map.

    Returns
    -------
    xarray.DataArray
        With an ``orient.map_right_to_left_codes`` provenance step.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.from_array(np.array([0, 3, 801, 806, 810], np.uint16).reshape(5, 1, 1)),
    ...                 np.eye(4), kind="labels")
    >>> map_right_to_left_codes(v).values.ravel().tolist()
    [0, 3, 801, 801, 805]
    """
    data = labels_vol.data if isinstance(labels_vol.data, da.Array) else da.asarray(labels_vol.data)
    if np.issubdtype(data.dtype, np.integer) and np.iinfo(data.dtype).max < min(_RIGHT):
        new = data  # a uint8/int8 map cannot hold right codes: nothing to do
    else:
        new = da.map_blocks(_map_codes_block, data, dtype=data.dtype)
    return like(
        labels_vol,
        new,
        step=provenance_record(
            "orient.map_right_to_left_codes", {"mapping": {str(k): v for k, v in RIGHT_TO_LEFT.items()}}
        ),
    )


# ----------------------------------------------------------------------------------------------------------
# side detection (chunked reductions)
# ----------------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _moments_nb(
    block: np.ndarray, offset: np.ndarray, ax: np.ndarray, threshold: Any, thresholded: bool
) -> tuple:  # pragma: no cover (compiled)
    """count, sum i, sum j, sum k (exact int64) and min / max world x of the selected voxels, in one pass.

    World x is ``((ax0 i + ax1 j) + ax2 k) + ax3``, the float expression of the NumPy broadcast, term for term.
    Every step of it is monotone in k, so along a row of fixed (i, j) its extremes are at the first and last
    selected k: two evaluations per row give the same min and max as evaluating every voxel."""
    ni, nj, nk = block.shape
    count = si = sj = sk = np.int64(0)
    xmin, xmax = np.inf, -np.inf
    for i in range(ni):
        fi = float(offset[0] + i)
        for j in range(nj):
            row = block[i, j]
            first, last, c, s = -1, -1, np.int64(0), np.int64(0)
            for k in range(nk):
                v = row[k]
                if (v > threshold) if thresholded else (v != 0):
                    if first < 0:
                        first = k
                    last = k
                    c += 1
                    s += k
            if c == 0:
                continue
            count += c
            si += c * (offset[0] + i)
            sj += c * (offset[1] + j)
            sk += s + c * offset[2]
            cij = ax[0] * fi + ax[1] * float(offset[1] + j)
            for k in (first, last):
                x = (cij + ax[2] * float(offset[2] + k)) + ax[3]
                xmin = min(xmin, x)
                xmax = max(xmax, x)
    return count, si, sj, sk, xmin, xmax


def _block_moments(
    block: np.ndarray, offset: tuple[int, int, int], affine: np.ndarray, threshold: float | None
) -> np.ndarray:
    """[count, sum i, sum j, sum k, min world x, max world x] of the selected voxels of one block.

    Selected = ``block > threshold`` (or ``block != 0`` without a threshold). Counts and index sums are exact
    integers held in float64 (exact below 2**53), so summing blocks in any order gives the same result.
    Compiled: 8.5 -> 2.3 ms per 128^3 chunk of a half-full mask (the NumPy version built a float64 block of world
    x to take its min and max), the same values to the bit (tests/test_orient.py compares it with that version).
    """
    if block.dtype == np.bool_:
        block = block.view(np.uint8)
    off = np.asarray(offset, dtype=np.int64)
    ax = np.ascontiguousarray(affine[0], dtype=np.float64)
    # NumPy compares a float block with a Python float in the block's precision (NEP 50): so does the kernel
    t = 0.0 if threshold is None else (block.dtype.type if block.dtype.kind == "f" else float)(threshold)
    count, si, sj, sk, xmin, xmax = _moments_nb(block, off, ax, t, threshold is not None)
    if count == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, np.inf, -np.inf])
    return np.array([count, si, sj, sk, xmin, xmax], dtype=np.float64)


def _chunk_moments(regions: list, origin: tuple, affine: np.ndarray, threshold: float | None) -> np.ndarray:
    return _block_moments(regions[0], origin, affine, threshold)


def _moments_tasks(data: da.Array, affine: np.ndarray, threshold: float | None) -> list:
    """One delayed moment task per chunk (a chunked reduction; each task reads and holds one chunk)."""
    return chunk_tasks(_chunk_moments, [data], affine, threshold, name="side-moments", with_origin=True)


def _combine_moments(parts: list, affine: np.ndarray) -> dict | None:
    arr = np.array(parts, dtype=np.float64).reshape(-1, 6)
    count = arr[:, 0].sum()
    if count == 0:
        return None
    centroid_vox = arr[:, 1:4].sum(axis=0) / count
    centroid = voxel_to_world(affine, centroid_vox[None])[0]
    return {
        "count": int(count),
        "centroid_mm": centroid,
        "x_range_mm": (float(arr[:, 4].min()), float(arr[:, 5].max())),
    }


def _otsu(hist: np.ndarray, edges: np.ndarray) -> float:
    """Otsu threshold (between-class variance maximum) from an integer histogram."""
    centres = 0.5 * (edges[:-1] + edges[1:])
    w = hist.astype(np.float64)
    w0 = np.cumsum(w)
    w1 = w0[-1] - w0
    m0 = np.cumsum(w * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def detect_side(scan_or_mask_vol: xr.DataArray, hypothalamus_vol: xr.DataArray, *, bins: int = 256) -> tuple[str, dict]:
    """Decide whether a hemisphere is left (``"L"``) or right (``"R"``) from where its hypothalamus lies.

    The hypothalamus lies on the medial face of a hemisphere, so in RAS+ world coordinates it sits on the +x
    side of the brain's centroid in a left hemisphere and on the -x side in a right one. World coordinates
    do not depend on voxel order, so no reorientation is needed; oblique affines are handled exactly.

    The brain is the volume's nonzero voxels when it is a mask or labels (``attrs["kind"]``); for an image
    it is the voxels above an Otsu threshold (so the dark bag/air does not pull the centroid). The
    hypothalamus is every nonzero voxel of ``hypothalamus_vol``.

    Computed eagerly by chunked reductions over the data (exact integer index sums per chunk; for an image
    three passes: min/max, a ``bins``-bin integer histogram, the moments), never by materialising a volume.

    Parameters
    ----------
    scan_or_mask_vol : xarray.DataArray
        The scan, or a brain mask or label map (3-D).
    hypothalamus_vol : xarray.DataArray
        The hypothalamus labels (3-D; any grid).
    bins : int
        Histogram bins of the Otsu threshold (images only).

    Returns
    -------
    side : "L" or "R"
    info : dict
        ``side``, ``hypothalamus_centroid_mm``, ``brain_centroid_mm`` (world mm), ``brain_x_range_mm``,
        ``offset_x_mm`` (hypothalamus x - brain x), ``relative_offset`` (offset / brain half-width along x),
        ``strength`` (``|relative_offset|``: how clear the decision is, 0 = a coin toss),
        ``min_strength`` (:data:`SIDE_MIN_STRENGTH`), ``confident`` (``strength >= min_strength``),
        ``brain_from`` and a one-line human ``reason``.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> m = np.zeros((10, 4, 4), np.uint8); m[1:9] = 1
    >>> h = np.zeros((10, 4, 4), np.uint16); h[8, 1:3, 1:3] = 801
    >>> side, info = detect_side(make_volume(da.from_array(m), np.eye(4), kind="mask"),
    ...                          make_volume(da.from_array(h), np.eye(4), kind="labels"))
    >>> side, round(info["offset_x_mm"], 1)
    ('L', 3.5)
    """
    a_b = affine_of(scan_or_mask_vol)
    a_h = affine_of(hypothalamus_vol)
    for v, what in ((scan_or_mask_vol, "brain"), (hypothalamus_vol, "hypothalamus")):
        if v.ndim != 3:
            raise ValueError(f"detect_side needs a 3-D {what} volume, got dims {v.dims}")
    b_parts, h_parts, brain_from = _side_moments(scan_or_mask_vol, hypothalamus_vol, a_b, a_h, bins)
    hyp = _combine_moments(h_parts, a_h)
    brain = _combine_moments(b_parts, a_b)
    if hyp is None:
        raise HelmError(
            "the hypothalamus labels are empty (no nonzero voxel); cannot detect the side",
            path=hypothalamus_vol.attrs.get("source") or None,
            hint="pass --side L or --side R",
        )
    if brain is None:
        raise HelmError(
            "the brain is empty (no voxel selected); cannot detect the side",
            path=scan_or_mask_vol.attrs.get("source") or None,
            hint="pass --side L or --side R",
        )
    return _side_decision(hyp, brain, brain_from)


def _side_moments(
    brain_vol: xr.DataArray, hyp_vol: xr.DataArray, a_b: np.ndarray, a_h: np.ndarray, bins: int
) -> tuple[list, list, str]:
    """The per-chunk moments of the brain and of the hypothalamus, and which voxels made the brain.

    A mask or labels: its nonzero voxels, in one computation with the hypothalamus. An image: the voxels above
    the Otsu threshold of its histogram (min/max with the hypothalamus, then the histogram, then the moments).
    """
    b = as_dask(brain_vol)
    h = as_dask(hyp_vol)
    kind = brain_vol.attrs.get("kind", "image")
    hyp_tasks = _moments_tasks(h, a_h, None)
    if kind in ("mask", "labels") or b.dtype == bool:
        brain_from = f"nonzero voxels of the {kind}"
        b_parts, h_parts = dask.compute(_moments_tasks(b, a_b, None), hyp_tasks)
        return b_parts, h_parts, brain_from
    lo, hi, h_parts = dask.compute(b.min(), b.max(), hyp_tasks)
    threshold = _otsu_threshold(b, float(lo), float(hi), bins, brain_vol.attrs.get("source") or None)
    brain_from = f"voxels of the scan above the Otsu threshold {threshold:.4g}"
    (b_parts,) = dask.compute(_moments_tasks(b, a_b, threshold))
    return b_parts, h_parts, brain_from


def _otsu_threshold(b: da.Array, lo: float, hi: float, bins: int, source: Any) -> float:
    """The Otsu threshold of a scan whose values span ``[lo, hi]`` (a ``bins``-bin histogram pass)."""
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise HelmError("the scan contains NaN or infinite values; cannot locate the brain", path=source)
    if hi > lo:
        hist, edges = da.histogram(b, bins=bins, range=(lo, hi))
        return _otsu(np.asarray(hist.compute()), np.asarray(edges))
    return lo - 1.0  # constant image: every voxel counts


def _side_decision(hyp: dict, brain: dict, brain_from: str) -> tuple[str, dict]:
    """The side, and :func:`detect_side`'s info, from the hypothalamus and brain moments."""
    hx, bx = float(hyp["centroid_mm"][0]), float(brain["centroid_mm"][0])
    xmin, xmax = brain["x_range_mm"]
    offset = hx - bx
    half_width = max(0.5 * (xmax - xmin), 1e-12)
    rel = offset / half_width
    side = "L" if offset > 0 else "R"
    confident = abs(rel) >= SIDE_MIN_STRENGTH
    reason = (
        f"the hypothalamus centroid (x = {hx:.2f} mm) lies {abs(offset):.2f} mm on the "
        f"{'+x' if offset > 0 else '-x'} side of the brain centroid (x = {bx:.2f} mm; brain spans x "
        f"{xmin:.2f} to {xmax:.2f} mm), and the hypothalamus is medial, so this is a "
        f"{'left' if side == 'L' else 'right'} hemisphere ({side})"
    )
    if not confident:
        reason += (
            f" -- weak evidence: the offset is only {100 * abs(rel):.0f}% of the brain half-width "
            f"(below {100 * SIDE_MIN_STRENGTH:.0f}%); check the side and pass --side L or --side R"
        )
    info = {
        "side": side,
        "hypothalamus_centroid_mm": [float(c) for c in hyp["centroid_mm"]],
        "brain_centroid_mm": [float(c) for c in brain["centroid_mm"]],
        "brain_x_range_mm": [xmin, xmax],
        "offset_x_mm": offset,
        "distance_mm": abs(offset),
        "relative_offset": rel,
        "strength": abs(rel),
        "min_strength": SIDE_MIN_STRENGTH,
        "confident": confident,
        "hypothalamus_voxels": hyp["count"],
        "brain_voxels": brain["count"],
        "brain_from": brain_from,
        "reason": reason,
    }
    return side, info


def _normalise_side(side: Any, *, allow_auto: bool = True) -> str:
    s = str(side).strip().lower() if side is not None else "auto"
    table = {"l": "L", "left": "L", "lh": "L", "r": "R", "right": "R", "rh": "R"}
    if allow_auto:
        table["auto"] = "auto"
    if s not in table:
        raise HelmError(
            f"--side must be {'L, R or auto' if allow_auto else 'L or R'}, got {side!r}",
            hint="pass --side L for a left hemisphere, --side R for a right one"
            + (", or --side auto to detect it from the hypothalamus labels" if allow_auto else ""),
        )
    return table[s]


def check_side(side_given: str, info: dict) -> str | None:
    """A warning message when the given side disagrees with :func:`detect_side`'s decision, else ``None``.

    Parameters
    ----------
    side_given : str or None
        The side asked for (``"L"``, ``"R"``, ``"left"``, ... or ``"auto"``; ``"auto"`` and None never warn).
    info : dict or None
        :func:`detect_side`'s info.

    Returns
    -------
    str or None

    Example
    -------
    >>> check_side("L", {"side": "L", "reason": "..."}) is None
    True
    """
    given = _normalise_side(side_given)
    if given == "auto" or info is None:
        return None
    detected = info["side"]
    if given == detected:
        return None
    return (
        f"--side {given} was given, but {info['reason']}. Proceeding with --side {given} as asked; "
        f"if that is wrong, rerun with --side {detected} (or --side auto)"
    )


def require_clear_side(info: dict, *, path: Any = None) -> None:
    """Raise :class:`HelmError` when :func:`detect_side`'s decision is too weak to act on (``--side auto``).

    Weak = ``info["strength"] < SIDE_MIN_STRENGTH``: the hypothalamus lies about as far left as right of
    the brain's centroid, so the side would be a guess -- and a wrong side mirrors the specimen the wrong
    way. The usual causes are a header (affine) that does not match the anatomy (the medial face does not
    point along x) or hypothalamus labels from another scan. An explicit side is trusted instead (the
    pipeline only warns when it disagrees, see :func:`check_side`).

    Parameters
    ----------
    info : dict
        :func:`detect_side`'s info.
    path : str, optional
        Named by the error.

    Example
    -------
    >>> require_clear_side({"strength": 0.5, "min_strength": 0.2})
    >>> require_clear_side({"strength": 0.05, "min_strength": 0.2, "offset_x_mm": 1.0,
    ...                     "relative_offset": 0.05})          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    helm_dask.errors.HelmError: --side auto cannot tell left from right: ...
    """
    strength = float(info.get("strength", abs(float(info.get("relative_offset", 0.0)))))
    limit = float(info.get("min_strength", SIDE_MIN_STRENGTH))
    if strength >= limit:
        return None
    raise HelmError(
        f"--side auto cannot tell left from right: the hypothalamus centroid lies only "
        f"{abs(float(info.get('offset_x_mm', 0.0))):.1f} mm ({100 * strength:.0f}% of the brain "
        f"half-width, {100 * limit:.0f}% needed) from the brain centroid along x; likely causes: a "
        "header (affine) that does not match the anatomy, or hypothalamus labels from another scan",
        path=path,
        hint="pass --side L or --side R if you know the side, or fix the header of the scan and labels",
    )


# ----------------------------------------------------------------------------------------------------------
# grid checks
# ----------------------------------------------------------------------------------------------------------


def _fmt(v: np.ndarray, digits: int = 4) -> str:
    return "(" + ", ".join(f"{x:.{digits}f}" for x in np.asarray(v, dtype=np.float64)) + ")"


def check_same_grid(
    scan_vol: xr.DataArray, labels_vol: xr.DataArray, *, path: Any = None, atol_mm: float = 1e-4, rtol: float = 1e-6
) -> None:
    """Raise :class:`HelmError` unless the scan and the labels sample the same voxel grid.

    Two grids are the same when, after :func:`to_ras` (which is exact), they have the same shape and the
    same affine within ``atol_mm + rtol * |value|`` (voxel-centre positions agree to about 1e-4 mm). So a
    label map stored in another voxel order (e.g. LAS vs RAS) of the same grid is accepted: stage 1
    reorients both exactly. The message lists every difference with numbers: shape, voxel size, origin
    (world position of the first voxel centre), orientation and, if needed, the largest corner mismatch.

    Parameters
    ----------
    scan_vol, labels_vol : xarray.DataArray
        The scan and the labels.
    path : str, optional
        Named by the error (default: the labels' source).
    atol_mm, rtol : float
        Tolerances on the affines' entries.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> s = make_volume(da.zeros((4, 4, 4)), np.eye(4))
    >>> check_same_grid(s, make_volume(da.zeros((4, 4, 4), dtype=np.uint16), np.eye(4), kind="labels"))
    """
    a_s, a_l = affine_of(scan_vol), affine_of(labels_vol)
    sh_s, sh_l = tuple(scan_vol.shape[:3]), tuple(labels_vol.shape[:3])
    rs_shape, rs_aff = ras_grid(sh_s, a_s)
    rl_shape, rl_aff = ras_grid(sh_l, a_l)
    same_shape = rs_shape == rl_shape
    tol = atol_mm + rtol * np.maximum(np.abs(rs_aff), np.abs(rl_aff))
    same_affine = bool(np.all(np.abs(rs_aff - rl_aff) <= tol))
    if same_shape and same_affine:
        return None
    diffs = []
    if not same_shape:
        diffs.append(f"shape {'x'.join(map(str, sh_s))} vs {'x'.join(map(str, sh_l))}")
    sp_s, sp_l = spacing_of(rs_aff), spacing_of(rl_aff)
    if not np.allclose(sp_s, sp_l, rtol=rtol, atol=atol_mm):
        diffs.append(f"voxel size (mm, RAS order) {_fmt(sp_s, 5)} vs {_fmt(sp_l, 5)}")
    org_s, org_l = rs_aff[:3, 3], rl_aff[:3, 3]
    if not np.allclose(org_s, org_l, rtol=rtol, atol=atol_mm):
        diffs.append(
            f"origin (world position of the first voxel centre after reorientation, mm) {_fmt(org_s)} "
            f"vs {_fmt(org_l)}, {float(np.linalg.norm(org_s - org_l)):.4f} mm apart"
        )
    code_s, code_l = orientation_code(a_s), orientation_code(a_l)
    dir_s = rs_aff[:3, :3] / sp_s
    dir_l = rl_aff[:3, :3] / sp_l
    cosang = np.clip(np.sum(dir_s * dir_l, axis=0), -1.0, 1.0)
    max_angle = float(np.degrees(np.arccos(cosang)).max())
    if code_s != code_l:
        diffs.append(f"orientation {code_s} vs {code_l}")
    if max_angle > 1e-6:
        diffs.append(f"voxel axis directions differ by up to {max_angle:.4f} degrees")
    if same_shape:
        # the far corner: catches whatever the items above do not (tiny shears, ...)
        corner = np.array([[n - 1 for n in rs_shape]], dtype=np.float64)
        gap = float(np.linalg.norm(voxel_to_world(rs_aff, corner) - voxel_to_world(rl_aff, corner)))
        diffs.append(f"the last voxel centres are {gap:.4f} mm apart")
    raise HelmError(
        "the scan and the labels are on different voxel grids: " + "; ".join(diffs),
        path=path if path is not None else (labels_vol.attrs.get("source") or None),
        hint="pass --resample-labels to resample the labels onto the scan grid by nearest neighbour",
    )


# ----------------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------------


def orient_subject(
    scan: xr.DataArray, labels: xr.DataArray | None, side: str = "auto", *, check: bool = True
) -> tuple[xr.DataArray, xr.DataArray | None, dict]:
    """Stage 1: reorient scan and labels to RAS+, mirror a right hemisphere to a left one, map label codes.

    Both volumes go through :func:`to_ras`; when the side is ``"R"`` both are flipped about the world plane
    x = 0 (:func:`flip_left_right`, so they stay registered); the labels then get the left codes
    (:func:`map_right_to_left_codes`, applied to every subject: every output is a left hemisphere). The
    scan and labels must already be on the same grid (see :func:`check_same_grid`).

    ``side="auto"`` detects the side with :func:`detect_side` (eager chunked reductions) and refuses a weak
    decision (:func:`require_clear_side`: :class:`HelmError`); with an explicit side and ``check=True`` the
    detection also runs and a disagreement is warned about (``UserWarning`` and ``info["warning"]``) with its
    numbers, and the given side is used (trusted). The volumes returned are lazy.

    Parameters
    ----------
    scan : xarray.DataArray
        The scan (or a brain mask).
    labels : xarray.DataArray or None
        The hypothalamus labels (needed by ``side="auto"``).
    side : str
        ``"L"``, ``"R"`` (or ``"left"``, ``"lh"``, ...) or ``"auto"``.
    check : bool
        With an explicit side, also run the detection and warn when it disagrees.

    Returns
    -------
    scan_ras_left, labels_ras_left, info
        ``info``: ``side`` (used), ``side_given``, ``flipped``, ``orientation_in`` (codes), ``orientation_out``,
        ``detection`` (the :func:`detect_side` info or ``None``), ``detection_error`` (why the advisory
        check could not run, e.g. empty labels, or ``None``), ``warning`` (message or ``None``) and
        ``message`` (one line saying what was decided and why).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> s = make_volume(da.ones((4, 3, 3)), np.diag([-1.0, 1, 1, 1]))
    >>> l = make_volume(da.zeros((4, 3, 3), dtype=np.uint16), np.diag([-1.0, 1, 1, 1]), kind="labels")
    >>> s2, l2, info = orient_subject(s, l, "R")
    >>> info["flipped"], info["orientation_out"]
    (True, 'RAS')
    """
    given = _normalise_side(side)
    detection: dict | None = None
    detection_error = None
    if given == "auto":
        if labels is None:
            raise HelmError(
                "--side auto needs the hypothalamus labels to decide the side", hint="pass --side L or --side R"
            )
        _, detection = detect_side(scan, labels)
        require_clear_side(detection, path=labels.attrs.get("source") or None)
        used = detection["side"]
    else:
        used = given
        if labels is not None and check:
            try:  # only advisory when the side is given: never fatal
                _, detection = detect_side(scan, labels)
            except HelmError as err:
                detection_error = str(err)
    warning = check_side(given, detection) if detection is not None else None
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
    info: dict[str, Any] = {
        "side": used,
        "side_given": given,
        "flipped": used == "R",
        "orientation_in": {
            "scan": orientation_code(affine_of(scan)),
            "labels": None if labels is None else orientation_code(affine_of(labels)),
        },
        "detection": detection,
        "detection_error": detection_error,
        "warning": warning,
    }
    scan_out, labels_out = _to_left_ras(scan, labels, used)
    info["orientation_out"] = orientation_code(affine_of(scan_out))
    info["message"] = _side_message(given, used, detection, warning)
    return scan_out, labels_out, info


def _to_left_ras(
    scan: xr.DataArray, labels: xr.DataArray | None, used: str
) -> tuple[xr.DataArray, xr.DataArray | None]:
    """Scan and labels in RAS+, mirrored to a left hemisphere when ``used`` is ``"R"``, labels with left codes."""
    scan_out = to_ras(scan)
    labels_out = None if labels is None else to_ras(labels)
    if used == "R":
        scan_out = flip_left_right(scan_out)
        if labels_out is not None:
            labels_out = flip_left_right(labels_out)
    if labels_out is not None:
        labels_out = map_right_to_left_codes(labels_out)
    return scan_out, labels_out


def _side_message(given: str, used: str, detection: dict | None, warning: str | None) -> str:
    """One line saying which side was used and why (:func:`orient_subject`'s ``info["message"]``)."""
    if given == "auto" and detection is not None:  # (auto always has a detection: it raises otherwise)
        message = f"--side auto: detected {used}: {detection['reason']}"
    else:
        message = f"--side {given} given" + (
            f"; detection agrees: {detection['reason']}" if detection is not None and not warning else ""
        )
    if used == "R":
        message += "; mirrored about world x = 0 to a left hemisphere"
    return message
