"""The nearest-neighbour label gather of a sample: :func:`gather_tasks` makes one task per source chunk."""

from __future__ import annotations

import dask
import numpy as np

from ..errors import HelmError
from ..io.regions import chunk_edges
from .bspline import _bspline_field
from .plan import SamplePlan

#: Largest label code: samples' labels are uint16.
_MAX_LABEL = np.iinfo(np.uint16).max
#: Output voxels per coordinate slab: bounds the float64 temporaries (~50 MB).
_SLAB_VOXELS = 1 << 20


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
            assert plan.deform_weights is not None  # made with deform_coef
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
    """The labels at within-chunk indices ``(i, j, k)`` of one chunk (the task :func:`gather_tasks` makes)."""
    return np.asarray(block)[i, j, k]


def gather_tasks(plan: SamplePlan) -> tuple[list, list[np.ndarray], np.ndarray]:
    """The lazy label gather of a sample: one ``dask.delayed`` task per source chunk that holds at least one
    needed voxel (the chunk and the within-chunk indices in, the labels out), the output positions each task
    fills, and the output positions inside the map. Memory per task: one chunk plus its share of the output.

    Parameters
    ----------
    plan : SamplePlan
        From :func:`~helm_dask.synth.plan_sample`.

    Returns
    -------
    tasks : list of dask.delayed
        One per source chunk; each computes the labels (in the map's dtype) of its output positions.
    positions : list of ndarray
        For each task, the flat (C-order) output indices it fills.
    inside : ndarray
        The flat output indices whose source voxel lies inside the map (the others are background, 0).

    Example
    -------
    >>> import dask, numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> from helm_dask.synth import SynthConfig, plan_sample, sample_params
    >>> vol = make_volume(da.ones((40, 40, 40), np.uint16, chunks=10), np.eye(4), kind="labels")
    >>> cfg = SynthConfig(crop=(8, 8, 8), center="volume").without_augmentation()
    >>> tasks, positions, inside = gather_tasks(plan_sample(vol, sample_params(cfg, 0, 0), cfg))
    >>> len(tasks), sum(len(p) for p in positions), int(sum(v.sum() for v in dask.compute(*tasks)))
    (8, 512, 512)
    """
    idx, flat = _source_indices(plan)
    if plan.box is None or flat.size == 0:
        return [], [], flat
    local = idx - plan.box_lo[:, None].astype(np.int32)
    bounds = chunk_edges(plan.box.chunks)
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
    """Gathered labels as uint16 codes, or a :class:`HelmError` for non-integer or out-of-range values."""
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
