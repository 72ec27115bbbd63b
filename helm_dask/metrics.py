"""Validation metrics between label maps, out of core: :func:`compare_volumes` gives Dice, the average
Hausdorff distance (mean and max of the two directed averages), HD95, HD and volumes per label and per paper
group, :func:`summarise`/:func:`format_table`/:func:`to_csv` turn rows into tables, and
:func:`kmeans_agreement` compares k-means maps with a tissue-class map (adjusted Rand index, best-match Dice);
the definitions, why the distances are exact and the values of empty labels are in ``docs/method/metrics.md``.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from .errors import HelmError
from .io.regions import chunk_edges
from .labels import FORNIX, HYPOTHALAMUS, PAPER_GROUPS, SHORT_NAMES
from .orient import flip_left_right, to_ras
from .resample import is_ras_aligned, ras_target_grid, resample_labels, resample_labels_to_grid, resample_to_grid
from .volume import affine_of, spacing_of

# --------------------------------------------------------------------------------------------- constants

# The vocabulary is labels.py's; these names stay for the callers of this module.
LABEL_NAMES: dict[int, str] = SHORT_NAMES
HYPOTHALAMIC_CODES: tuple[int, ...] = tuple(HYPOTHALAMUS)
FORNIX_CODE = FORNIX
#: Codes compared by default (``labels=None``): hypothalamic subunits and fornix.
DEFAULT_CODES: tuple[int, ...] = HYPOTHALAMIC_CODES + (FORNIX_CODE,)

#: Numeric fields of a result row, in output order.
METRIC_FIELDS: tuple[str, ...] = (
    "dice",
    "avg_hd_mean_mm",
    "avg_hd_max_mm",
    "d_ab_mm",
    "d_ba_mm",
    "hd95_mm",
    "hd_mm",
    "volume_a_mm3",
    "volume_b_mm3",
    "voxels_a",
    "voxels_b",
)
ROW_FIELDS: tuple[str, ...] = ("name", "kind", "codes", "status") + METRIC_FIELDS

DEFINITIONS = (
    "avg HD = average Hausdorff distance over all voxels (Taha & Hanbury 2015), in mm between voxel "
    "centres; 'mean' = mean of the two directed average distances, 'max' = the larger of the two; "
    "HD95 = larger of the two directed 95th percentiles; Dice in voxels; volumes in mm3."
)

STATUS_OK = "ok"
STATUS_BOTH_EMPTY = "absent in both"
STATUS_A_EMPTY = "absent in A"
STATUS_B_EMPTY = "absent in B"
STATUS_TOO_LARGE = "too large for distances"

DEFAULT_MAX_BOX_VOXELS = 2**25  # ~33 M voxels: ~1 GB of working memory for the distance transforms


# ------------------------------------------------------------------------------------- in-memory core


def _check_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise HelmError(
            f"the two masks have different shapes {a.shape} and {b.shape}", hint="Compare maps on the same grid."
        )
    return a.astype(bool, copy=False), b.astype(bool, copy=False)


def dice(a_bool: Any, b_bool: Any) -> float:
    """Dice overlap ``2 |A n B| / (|A| + |B|)`` of two boolean arrays.

    Parameters
    ----------
    a_bool, b_bool : array_like
        Same shape; non-zero is inside.

    Returns
    -------
    float
        The Dice coefficient; NaN when both are empty.

    Example
    -------
    >>> import numpy as np
    >>> dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    0.5
    """
    a, b = _check_pair(a_bool, b_bool)
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    return _dice_from_counts(int(np.count_nonzero(a & b)), na, nb)


def _dice_from_counts(inter: int, na: int, nb: int) -> float:
    if na + nb == 0:
        return math.nan
    return 2.0 * inter / (na + nb)


def _empty_distances(status: str) -> dict:
    v = math.inf if status in (STATUS_A_EMPTY, STATUS_B_EMPTY) else math.nan
    return dict(mean=v, max=v, d_ab=v, d_ba=v, hd95=v, hd=v, status=status)


def _spacing_vec(spacing_mm: Any, ndim: int) -> tuple[float, ...]:
    s = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (ndim,))
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise HelmError(f"voxel spacing must be positive and finite, got {s.tolist()}")
    return tuple(float(x) for x in s)


def average_hausdorff(a_bool: Any, b_bool: Any, spacing_mm: Any) -> dict:
    """Average Hausdorff distance (both summaries), HD95 and HD between two boolean arrays, in mm.

    In memory and exact (definitions in ``docs/method/metrics.md``). The work is confined to the
    bounding box of ``A u B``, which does not change the result.

    Parameters
    ----------
    a_bool, b_bool : array_like of bool, same shape (any dimension)
    spacing_mm : float or sequence of floats
        Voxel size along each array axis (orthogonal axes).

    Returns
    -------
    dict
        ``mean`` = (d_ab + d_ba)/2, ``max`` = max(d_ab, d_ba), ``d_ab``, ``d_ba`` (directed averages),
        ``hd95`` (larger directed 95th percentile), ``hd`` (Hausdorff), ``status``; empty sets give NaN
        (both empty, status "absent in both") or inf (one empty, status "absent in A"/"absent in B").

    Example
    -------
    >>> import numpy as np
    >>> a = np.zeros((1, 4), bool); a[0, 0] = True
    >>> b = np.zeros((1, 4), bool); b[0, 3] = True
    >>> r = average_hausdorff(a, b, (1.0, 0.5))
    >>> r["mean"], r["hd"]
    (1.5, 1.5)
    """
    a, b = _check_pair(a_bool, b_bool)
    sp = _spacing_vec(spacing_mm, a.ndim)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not (has_a or has_b):
        return _empty_distances(STATUS_BOTH_EMPTY)
    if not has_a:
        return _empty_distances(STATUS_A_EMPTY)
    if not has_b:
        return _empty_distances(STATUS_B_EMPTY)
    # Crop to the union's bounding box: all of B (and A) lies inside, so nearest points are inside (exact).
    box = ndi.find_objects((a | b).astype(np.uint8))[0]
    return _distances_in_box(a[box], b[box], sp)


def _distances_in_box(a: np.ndarray, b: np.ndarray, sp: Sequence[float]) -> dict:
    """Exact distances; ``a`` and ``b`` are non-empty and entirely inside the array."""
    # EDT of ~B: for every voxel, the distance to the nearest voxel centre of B (0 on B). Read it on A.
    d_a = ndi.distance_transform_edt(~b, sampling=sp)[a]
    d_b = ndi.distance_transform_edt(~a, sampling=sp)[b]
    d_ab, d_ba = float(np.mean(d_a)), float(np.mean(d_b))
    return dict(
        mean=0.5 * (d_ab + d_ba),
        max=max(d_ab, d_ba),
        d_ab=d_ab,
        d_ba=d_ba,
        hd95=float(max(np.percentile(d_a, 95), np.percentile(d_b, 95))),
        hd=float(max(d_a.max(), d_b.max())),
        status=STATUS_OK,
    )


# --------------------------------------------------------------------------- chunked statistics pass


def _block_stats(a: np.ndarray, b: np.ndarray, offset: Sequence[int]) -> dict:
    """Per-code counts and bounding boxes in A and B, and joint (A code, B code) counts, for one block.

    Codes 0 (background) are dropped. Memory: a few arrays of the block's size.
    """
    out: dict = {}
    inverses = []
    for key, x in (("a", a), ("b", b)):
        codes, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        inv = inv.reshape(x.shape)
        inverses.append((codes, inv))
        # find_objects on the dense label index gives every code's bounding box in one O(N) pass.
        boxes = ndi.find_objects(inv + 1)
        per = {}
        for c, n, sl in zip(codes.tolist(), counts.tolist(), boxes):
            if c == 0:
                continue
            lo = tuple(s.start + o for s, o in zip(sl, offset))
            hi = tuple(s.stop - 1 + o for s, o in zip(sl, offset))
            per[int(c)] = (int(n), lo, hi)
        out[key] = per
    (ca, ia), (cb, ib) = inverses
    nb = len(cb)
    keys = ia.astype(np.int64) * nb + ib
    if len(ca) * nb <= 4 * keys.size:
        counts = np.bincount(keys.ravel(), minlength=len(ca) * nb)
        nz = np.flatnonzero(counts)
        pairs, pc = nz, counts[nz]
    else:  # many codes: avoid a huge dense joint table
        pairs, pc = np.unique(keys, return_counts=True)
    joint = {}
    for k, n in zip(pairs.tolist(), pc.tolist()):
        c1, c2 = int(ca[k // nb]), int(cb[k % nb])
        if c1 != 0 and c2 != 0:
            joint[(c1, c2)] = int(n)
    out["joint"] = joint
    return out


def _merge_stats(*parts: dict) -> dict:
    """Merge block statistics: sums of counts, min/max of bounding boxes (order-independent, integer)."""
    out: dict = {"a": {}, "b": {}, "joint": {}}
    for p in parts:
        for key in ("a", "b"):
            dst = out[key]
            for c, (n, lo, hi) in p[key].items():
                if c in dst:
                    n0, lo0, hi0 = dst[c]
                    dst[c] = (n0 + n, tuple(map(min, lo0, lo)), tuple(map(max, hi0, hi)))
                else:
                    dst[c] = (n, lo, hi)
        for k, n in p["joint"].items():
            out["joint"][k] = out["joint"].get(k, 0) + n
    return out


def label_statistics(a_data: Any, b_data: Any, *, fan_in: int = 8) -> dict:
    """Per-code voxel counts and bounding boxes of two label arrays, and their joint code-pair counts.

    One chunked pass (``b`` is rechunked to ``a``'s chunks, lazily), merged in a tree of ``fan_in``;
    computed eagerly; the result is small (one entry per code / code pair). Exact integers: identical for
    every chunking.

    Parameters
    ----------
    a_data, b_data : array_like
        Integer label arrays of one shape (dask arrays stay lazy until the pass).
    fan_in : int
        Partial results merged per task.

    Returns
    -------
    dict
        ``{"a": {code: (count, lo_ijk, hi_ijk)}, "b": {...}, "joint": {(code_a, code_b): count}}``, with
        inclusive voxel-index bounds and code 0 left out.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> a = da.from_array(np.array([[[0, 5, 5, 0]]]), chunks=2)
    >>> s = label_statistics(a, a)
    >>> s["a"][5], s["joint"][(5, 5)]
    ((2, (0, 0, 1), (0, 0, 2)), 2)
    """
    import dask
    import dask.array as da

    a = a_data if isinstance(a_data, da.Array) else da.asarray(a_data)
    b = b_data if isinstance(b_data, da.Array) else da.asarray(b_data)
    b = b.rechunk(a.chunks)
    starts = [e[:-1].tolist() for e in chunk_edges(a.chunks)]
    ablocks, bblocks = a.to_delayed(), b.to_delayed()
    parts = []
    for idx in itertools.product(*(range(len(c)) for c in a.chunks)):
        off = tuple(starts[d][i] for d, i in enumerate(idx))
        parts.append(dask.delayed(_block_stats, pure=True)(ablocks[idx], bblocks[idx], off))
    if not parts:
        return {"a": {}, "b": {}, "joint": {}}
    while len(parts) > 1:
        parts = [dask.delayed(_merge_stats, pure=True)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    (res,) = dask.compute(parts[0])
    return res


# ------------------------------------------------------------------------------------ compare volumes


def _check_labels_volume(vol: Any, what: str):
    import dask.array as da

    data = getattr(vol, "data", None)
    if data is None or "affine" not in getattr(vol, "attrs", {}):
        raise HelmError(
            f"{what} is not a volume (an xarray.DataArray with attrs['affine'])",
            hint="Open it with helm_dask.io or build it with helm_dask.make_volume.",
        )
    if data.ndim != 3:
        raise HelmError(f"{what} is {data.ndim}-D; label maps are 3-D", path=vol.attrs.get("source") or None)
    dt = np.dtype(data.dtype)
    if not (np.issubdtype(dt, np.integer) or dt == np.bool_):
        raise HelmError(
            f"{what} has dtype {dt}, not an integer label map",
            path=vol.attrs.get("source") or None,
            hint="Compare label maps (integer codes); cast with .astype() if the values are codes.",
        )
    return data if isinstance(data, da.Array) else da.asarray(data)


def _check_orthogonal(affine: np.ndarray, source: str | None) -> np.ndarray:
    m = affine[:3, :3]
    sp = np.sqrt((m**2).sum(axis=0))
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise HelmError("the affine has a zero or non-finite voxel size", path=source or None)
    cos = (m.T @ m) / np.outer(sp, sp)
    if np.max(np.abs(cos - np.eye(3))) > 1e-4:
        raise HelmError(
            "the voxel axes are not orthogonal (sheared affine), so voxel-grid distances in mm would not be exact",
            path=source or None,
            hint="Resample the maps onto an orthogonal grid first (helm_dask.resample).",
        )
    return sp


def _same_grid(a_vol, b_vol, atol: float = 1e-6) -> str | None:
    """None when A and B share shape and affine (to ``atol``), else a description of the difference."""
    sa, sb = tuple(a_vol.shape), tuple(b_vol.shape)
    if sa != sb:
        return f"shapes differ: A {sa}, B {sb}"
    fa, fb = affine_of(a_vol), affine_of(b_vol)
    diff = float(np.max(np.abs(fa - fb)))
    if diff > atol:
        return (
            f"affines differ by up to {diff:.3g} mm (A spacing {np.round(np.sqrt((fa[:3, :3] ** 2).sum(0)), 6)}"
            f", B spacing {np.round(np.sqrt((fb[:3, :3] ** 2).sum(0)), 6)}; A origin "
            f"{np.round(fa[:3, 3], 4)}, B origin {np.round(fb[:3, 3], 4)})"
        )
    return None


def label_name(code: int) -> str:
    """Human-readable name of a code.

    Parameters
    ----------
    code : int
        A label code.

    Returns
    -------
    str
        The short name of a hypothalamic subunit or the fornix, else ``"label N"``.

    Example
    -------
    >>> label_name(803), label_name(7)
    ('L posterior', 'label 7')
    """
    return LABEL_NAMES.get(int(code), f"label {int(code)}")


def _select_items(stats: dict, labels: Any, groups: Any) -> list[tuple[str, str, tuple[int, ...]]]:
    present = sorted(set(stats["a"]) | set(stats["b"]))
    if labels is None:
        codes = [c for c in present if c in DEFAULT_CODES]
    elif isinstance(labels, str):
        if labels.strip().lower() != "all":
            raise HelmError(f"labels must be None, 'all' or a list of codes, got {labels!r}")
        codes = present
    else:
        try:
            codes = sorted({int(c) for c in labels})
        except (TypeError, ValueError):
            raise HelmError(f"labels must be None, 'all' or a list of integer codes, got {labels!r}") from None
        if 0 in codes:
            raise HelmError("label 0 is the background and cannot be compared", hint="Leave 0 out of labels.")
    items: list[tuple[str, str, tuple[int, ...]]] = [(label_name(c), "label", (c,)) for c in codes]
    if groups is None:
        return items
    if isinstance(groups, str):
        if groups.strip().lower() != "paper":
            raise HelmError(f"groups must be 'paper', None or a dict name -> codes, got {groups!r}")
        pres = set(present)
        for name, gcodes in PAPER_GROUPS.items():
            # A side's groups only when that side has labels in either map (a left hemisphere has no 806-810).
            side = PAPER_GROUPS[name.split()[0] + " whole"]
            if pres & set(side):
                items.append((name, "group", tuple(gcodes)))
    elif isinstance(groups, Mapping):
        for name, gcodes in groups.items():
            gc = tuple(sorted({int(c) for c in gcodes}))
            if not gc or 0 in gc:
                raise HelmError(f"group {name!r} must list one or more non-zero codes, got {list(gcodes)}")
            items.append((str(name), "group", gc))
    else:
        raise HelmError(f"groups must be 'paper', None or a dict name -> codes, got {groups!r}")
    return items


def _box_metrics(a_box: np.ndarray, b_box: np.ndarray, codes: tuple[int, ...], sp: tuple[float, ...]) -> dict:
    """Distances of one label/group from its loaded box (the box contains all of A and B for ``codes``)."""
    a = np.isin(a_box, codes)
    b = np.isin(b_box, codes)
    return _distances_in_box(a, b, sp)


def compare_volumes(
    a_vol,
    b_vol,
    *,
    labels: Any = None,
    groups: Any = "paper",
    margin_mm: float = 2.0,
    max_box_voxels: int = DEFAULT_MAX_BOX_VOXELS,
    resample_b: bool = False,
) -> list[dict]:
    """Compare two label maps per label and per group: Dice, average Hausdorff (mean and max), HD95, volumes.

    Out of core: one chunked statistics pass over both maps (:func:`label_statistics`), then, for each
    label/group, only the union bounding box of its voxels in A and B (plus ``margin_mm``, clipped to the
    volume) is loaded and the exact distances are computed there in memory. Computed eagerly; the result
    is a small list of rows. Dice and volumes are exact integer-count results for every chunking.

    Parameters
    ----------
    a_vol, b_vol : xarray.DataArray
        Label volumes (integer codes) on the same grid (shape and affine equal to 1e-6 mm).
    labels : None, "all" or iterable of int
        None: the hypothalamic codes 801-810 and the fornix 250 present in either map; "all": every non-zero
        code present; a list: exactly those codes (absent ones give status "absent in both").
    groups : "paper", None or dict name -> codes
        "paper": :data:`PAPER_GROUPS` (whole, anterior, tuberal, posterior) for each side that has labels in
        either map; a dict: your own groups (a group is the union of its codes).
    margin_mm : float
        Extra border around each box. Does not change any result (the box already holds both sets).
    max_box_voxels : int
        Largest box for the distance computation (memory ~30 bytes per box voxel). Larger labels get Dice
        and volumes, and NaN distances with status "too large for distances".
    resample_b : bool
        If the grids differ: False (default) raises HelmError; True resamples B onto A's grid by nearest
        neighbour (in world space, lazily) and compares there.

    Returns
    -------
    list of dict
        One row per label then per group, with the keys :data:`ROW_FIELDS` (``codes`` is a tuple).

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> lab = np.zeros((6, 4, 4), np.uint16); lab[1:3, 1:3, 1:3] = 803
    >>> a = make_volume(da.from_array(lab, chunks=3), np.diag([0.3, 0.3, 0.6, 1]), kind="labels")
    >>> rows = compare_volumes(a, a)
    >>> [(r["name"], r["dice"], r["avg_hd_mean_mm"], round(r["volume_a_mm3"], 3)) for r in rows[:2]]
    [('L posterior', 1.0, 0.0, 0.432), ('L whole', 1.0, 0.0, 0.432)]
    >>> rows[2]["name"], rows[2]["status"]
    ('L anterior', 'absent in both')
    """
    import dask

    a_data, b_data, affine = _aligned_pair(a_vol, b_vol, resample_b)
    sp = _check_orthogonal(affine, a_vol.attrs.get("source") or None)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    if margin_mm < 0 or not math.isfinite(margin_mm):
        raise HelmError(f"margin_mm must be >= 0, got {margin_mm}")
    if int(max_box_voxels) < 1:
        raise HelmError(f"max_box_voxels must be >= 1, got {max_box_voxels}")
    margin = np.ceil(margin_mm / sp - 1e-9).astype(int)
    shape = np.array(a_data.shape)
    b_data = b_data.rechunk(a_data.chunks)

    stats = label_statistics(a_data, b_data)
    items = _select_items(stats, labels, groups)

    rows: list[dict] = []
    tasks, task_rows = [], []
    for name, kind, codes in items:
        row = _count_row(name, kind, codes, stats, voxel_mm3)
        na, nb = row["voxels_a"], row["voxels_b"]
        if na == 0 or nb == 0:
            st = STATUS_BOTH_EMPTY if na == nb == 0 else (STATUS_A_EMPTY if na == 0 else STATUS_B_EMPTY)
            row.update(_row_distances(_empty_distances(st)))
        else:
            sl = _distance_box(stats, codes, margin, shape, int(max_box_voxels))
            if sl is None:
                row.update(_row_distances(_empty_distances(STATUS_TOO_LARGE)))
            else:
                tasks.append(
                    dask.delayed(_box_metrics, pure=True)(
                        a_data[sl], b_data[sl], tuple(codes), tuple(float(x) for x in sp)
                    )
                )
                task_rows.append(row)
        rows.append(row)
    for row, res in zip(task_rows, dask.compute(*tasks)):
        row.update(_row_distances(res))
    return [{k: r[k] for k in ROW_FIELDS} for r in rows]


def _aligned_pair(a_vol: Any, b_vol: Any, resample_b: bool) -> tuple[Any, Any, np.ndarray]:
    """``(a_data, b_data, affine)``: both maps checked and on A's grid (B resampled there if asked)."""
    a_data = _check_labels_volume(a_vol, "A")
    _check_labels_volume(b_vol, "B")
    src_a = a_vol.attrs.get("source") or None
    diff = _same_grid(a_vol, b_vol)
    if diff is not None:
        if not resample_b:
            raise HelmError(
                f"A and B are on different grids ({diff})",
                path=src_a,
                hint="Resample one map onto the other's grid by nearest neighbour "
                "(helm_dask.resample.resample_to_grid, or resample_b=True) and compare again.",
            )

        b_vol = resample_to_grid(b_vol, tuple(a_vol.shape), affine_of(a_vol), order=0)
    b_data = _check_labels_volume(b_vol, "B")
    return a_data, b_data, affine_of(a_vol)


def _count_row(name: str, kind: str, codes: tuple[int, ...], stats: dict, voxel_mm3: float) -> dict:
    """A result row with what the integer counts give: Dice, voxels and volumes (status "ok" so far)."""
    cs = set(codes)
    na = sum(stats["a"][c][0] for c in codes if c in stats["a"])
    nb = sum(stats["b"][c][0] for c in codes if c in stats["b"])
    inter = sum(n for (c1, c2), n in stats["joint"].items() if c1 in cs and c2 in cs)
    return dict(
        name=name,
        kind=kind,
        codes=tuple(codes),
        status=STATUS_OK,
        dice=_dice_from_counts(inter, na, nb),
        voxels_a=na,
        voxels_b=nb,
        volume_a_mm3=na * voxel_mm3,
        volume_b_mm3=nb * voxel_mm3,
    )


def _distance_box(
    stats: dict, codes: tuple[int, ...], margin: np.ndarray, shape: np.ndarray, max_box_voxels: int
) -> tuple[slice, ...] | None:
    """The union bounding box of ``codes`` in A and B plus ``margin`` (clipped); None when it is too large."""
    boxes = [stats[k][c] for k in ("a", "b") for c in codes if c in stats[k]]
    lo = np.maximum(np.min([bx[1] for bx in boxes], axis=0) - margin, 0)
    hi = np.minimum(np.max([bx[2] for bx in boxes], axis=0) + margin, shape - 1)
    if int(np.prod(hi - lo + 1)) > max_box_voxels:
        return None
    return tuple(slice(int(l), int(h) + 1) for l, h in zip(lo, hi))


def _row_distances(d: Mapping[str, Any]) -> dict:
    return dict(
        avg_hd_mean_mm=d["mean"],
        avg_hd_max_mm=d["max"],
        d_ab_mm=d["d_ab"],
        d_ba_mm=d["d_ba"],
        hd95_mm=d["hd95"],
        hd_mm=d["hd"],
        status=d["status"],
    )


# ----------------------------------------------------------------------------------- batches and output


def summarise(rows_per_subject: Mapping[str, Sequence[Mapping[str, Any]]], *, ddof: int = 1) -> list[dict]:
    """Mean and standard deviation over subjects of every metric, per label/group (like the paper's Table 2).

    Rows are matched by ``(kind, name)``. For each metric, non-finite values (NaN/inf from absent labels or boxes
    too large) are left out; ``n_subjects`` counts the subjects having the row, ``n_ok`` those whose status
    is "ok", and ``<metric>_n`` the values used.

    Parameters
    ----------
    rows_per_subject : mapping of str to list of dict
        :func:`compare_volumes` rows per subject.
    ddof : int
        Delta degrees of freedom of the standard deviation; 1 gives the sample standard deviation (NaN for
        n < 2).

    Returns
    -------
    list of dict
        One row per label/group (first-seen order): ``name``, ``kind``, ``codes``, ``n_subjects``, ``n_ok`` and
        ``<metric>_mean``, ``<metric>_std``, ``<metric>_n`` for every metric present.

    Example
    -------
    >>> r = lambda d: [dict(name="L whole", kind="group", codes=(801,), status="ok", dice=d)]
    >>> s = summarise({"s1": r(0.8), "s2": r(0.9)})[0]
    >>> round(s["dice_mean"], 6), round(s["dice_std"], 6), s["n_subjects"]
    (0.85, 0.070711, 2)
    """
    order: list[tuple[str, str]] = []
    by_name: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for subject in rows_per_subject:
        for row in rows_per_subject[subject]:
            key = (str(row.get("kind", "")), row["name"])  # "L posterior" is both a label and a group
            if key not in by_name:
                order.append(key)
                by_name[key] = []
            by_name[key].append(row)
    out = []
    for key in order:
        name, rs = key[1], by_name[key]
        s: dict[str, Any] = dict(
            name=name,
            kind=rs[0].get("kind", ""),
            codes=tuple(rs[0].get("codes", ())),
            n_subjects=len(rs),
            n_ok=sum(r.get("status") == STATUS_OK for r in rs),
        )
        for m in METRIC_FIELDS:
            if not any(m in r for r in rs):
                continue
            v = np.array([float(r[m]) for r in rs if m in r and r[m] is not None], dtype=np.float64)
            v = v[np.isfinite(v)]
            s[f"{m}_mean"] = float(np.mean(v)) if v.size else math.nan
            s[f"{m}_std"] = float(np.std(v, ddof=ddof)) if v.size > ddof else math.nan
            s[f"{m}_n"] = int(v.size)
        out.append(s)
    return out


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


_TABLE_COLUMNS = (
    ("Dice", "dice", 3),
    ("avgHD mean", "avg_hd_mean_mm", 3),
    ("avgHD max", "avg_hd_max_mm", 3),
    ("HD95", "hd95_mm", 3),
    ("HD", "hd_mm", 3),
    ("vol A mm3", "volume_a_mm3", 2),
    ("vol B mm3", "volume_b_mm3", 2),
)


def _codes_text(codes: Iterable[int]) -> str:
    return "+".join(str(int(c)) for c in codes)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A readable aligned text table of :func:`compare_volumes` rows, or of :func:`summarise` rows
    (cells ``mean +- std``), with the definitions in a footer.

    Parameters
    ----------
    rows : sequence of dict
        Rows of one kind (summary rows are recognised by ``n_subjects``).

    Returns
    -------
    str
        The table, its units and :data:`DEFINITIONS`.

    Example
    -------
    >>> row = dict(name="L posterior", kind="label", codes=(803,), status="ok", dice=0.9, avg_hd_mean_mm=0.2,
    ...            avg_hd_max_mm=0.3, hd95_mm=0.6, hd_mm=0.9, volume_a_mm3=10.0, volume_b_mm3=11.0)
    >>> print(format_table([row]).splitlines()[2])
    L posterior  803    label  0.900  0.200       0.300      0.600  0.900  10.00      11.00      ok
    """
    summary = any("n_subjects" in r for r in rows)
    header = ["label", "codes", "kind"] + [c[0] for c in _TABLE_COLUMNS]
    header += ["n"] if summary else ["status"]
    body = []
    for r in rows:
        cells = [str(r.get("name", "")), _codes_text(r.get("codes", ())), str(r.get("kind", ""))]
        for _, key, digits in _TABLE_COLUMNS:
            if summary:
                m, s = r.get(f"{key}_mean"), r.get(f"{key}_std")
                cells.append("n/a" if m is None or math.isnan(float(m)) else f"{_fmt(m, digits)} +- {_fmt(s, digits)}")
            else:
                cells.append(_fmt(r.get(key), digits))
        if summary:
            cells.append(f"{r.get('n_ok', '?')}/{r.get('n_subjects', '?')} ok")
        else:
            cells.append(str(r.get("status", "")))
        body.append(cells)
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    units = "distances in mm; " + ("mean +- std over subjects (sample std); " if summary else "")
    out = [line(header), line(["-" * w for w in widths])] + [line(c) for c in body]
    out += ["", units + DEFINITIONS]
    return "\n".join(out)


def _csv_value(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return _codes_text(v)
    if isinstance(v, float):
        return repr(v)  # full precision; 'nan' / 'inf' for undefined / absent
    return v


def to_csv(rows: Any, path: str | os.PathLike) -> str:
    """Write rows (a list, or a dict subject -> rows, which adds a ``subject`` column) as CSV; returns the path.

    Codes are written ``801+802``; undefined values ``nan``, one-sided absences ``inf``.

    Parameters
    ----------
    rows : list of dict, or mapping of str to list of dict
        Result rows, or rows per subject.
    path : path-like
        The CSV file written.

    Returns
    -------
    str
        ``path``.

    Example
    -------
    >>> import tempfile, os
    >>> p = to_csv([dict(name="L posterior", codes=(803,), dice=0.5)], os.path.join(tempfile.mkdtemp(), "m.csv"))
    >>> open(p).read().splitlines()
    ['name,codes,dice', 'L posterior,803,0.5']
    """
    if isinstance(rows, Mapping):
        flat = [dict(subject=s, **r) for s, rs in rows.items() for r in rs]
    else:
        flat = [dict(r) for r in rows]
    fields: list[str] = []
    for r in flat:
        fields += [k for k in r if k not in fields]
    path = os.fspath(path)
    try:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            for r in flat:
                w.writerow({k: _csv_value(v) for k, v in r.items()})
    except OSError as e:
        raise HelmError(
            f"cannot write the CSV file ({e.strerror})",
            path=path,
            exit_code=3,
            hint="Check that the folder exists and is writable.",
        ) from None
    return path


def to_jsonable(rows: Any) -> Any:
    """The rows (or dict subject -> rows) with tuples as lists and non-finite numbers as None (strict JSON);
    ``status`` still says why a value is missing.

    Parameters
    ----------
    rows : list of dict, or mapping of str to list of dict
        Result rows, or rows per subject.

    Returns
    -------
    list of dict, or dict of str to list of dict
        The same structure, JSON-able.

    Example
    -------
    >>> to_jsonable([dict(codes=(801, 802), hd_mm=float("inf"))])
    [{'codes': [801, 802], 'hd_mm': None}]
    """
    if isinstance(rows, Mapping):
        return {str(k): to_jsonable(v) for k, v in rows.items()}
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            d[k] = v
        out.append(d)
    return out


_SUFFIXES = (".nii.gz", ".nii", ".zarr", ".mgz", ".mgh")


def subject_name(path: str | os.PathLike) -> str:
    """File name without folder and image suffix.

    Parameters
    ----------
    path : str or path-like
        A file (``.nii.gz``, ``.nii``, ``.zarr``, ``.mgz``, ``.mgh``) or folder.

    Returns
    -------
    str

    Example
    -------
    >>> subject_name("maps/sub-01_labels.nii.gz")
    'sub-01_labels'
    """
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    for suf in _SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def pair_by_name(paths_a: Iterable[str | os.PathLike], paths_b: Iterable[str | os.PathLike]):
    """Pair two lists of files by :func:`subject_name`.

    Parameters
    ----------
    paths_a, paths_b : iterable of path-like
        The files of each side; a name twice on one side raises HelmError.

    Returns
    -------
    tuple
        ``(pairs, only_a, only_b)``: ``pairs`` a sorted list of ``(name, path_a, path_b)``, and the sorted
        names found on one side only.

    Example
    -------
    >>> pair_by_name(["a/s1.nii.gz", "a/s2.nii"], ["b/s1.zarr"])
    ([('s1', 'a/s1.nii.gz', 'b/s1.zarr')], ['s2'], [])
    """

    def index(paths: Iterable[str | os.PathLike], side: str) -> dict[str, str]:
        d: dict[str, str] = {}
        for p in paths:
            n = subject_name(p)
            if n in d:
                raise HelmError(
                    f"two files in {side} have the same subject name {n!r}: {d[n]} and {p}",
                    hint="Keep one map per subject in each folder.",
                )
            d[n] = os.fspath(p)
        return d

    da_, db_ = index(paths_a, "A"), index(paths_b, "B")
    pairs = [(n, da_[n], db_[n]) for n in sorted(set(da_) & set(db_))]
    return pairs, sorted(set(da_) - set(db_)), sorted(set(db_) - set(da_))


# ------------------------------------------------------------------------------- k-means vs a tissue map
#
# Agreement of unsupervised k-means maps with a reference tissue-class map (e.g. a phantom's truth_tissue):
# the adjusted Rand index (Hubert & Arabie 1985) inside the brain, and per tissue class the Dice of its
# best-matching single cluster. Both follow from the contingency table of (cluster, class) voxel counts, which one
# chunked pass collects exactly (np.bincount per block, integer sums merged in a tree): identical for any chunking,
# and nothing larger than a block is ever held.

#: Names of the phantoms' tissue classes (:data:`helm_dask.phantom.TISSUE_NAMES`; the template phantom has no 4).
TISSUE_CLASS_NAMES: dict[int, str] = {
    0: "outside",
    1: "CSF/fluid",
    2: "grey matter",
    3: "white matter",
    4: "deep grey matter",
    5: "hypothalamus",
}


def _as_label_data(x: Any, what: str):
    """Dask array of integer codes from a volume (``.data``), a dask array or an array-like."""
    import dask.array as da

    data = getattr(x, "data", x) if hasattr(x, "attrs") else x
    data = data if isinstance(data, da.Array) else da.asarray(np.asarray(data))
    dt = np.dtype(data.dtype)
    if dt == np.bool_:
        data = data.astype(np.uint8)
    elif not np.issubdtype(dt, np.integer):
        raise HelmError(
            f"{what} has dtype {dt}, not integer codes",
            hint="give label maps (integer codes); cast with .astype() if the values are codes",
        )
    return data


def _pair_counts(a: np.ndarray, b: np.ndarray) -> dict:
    """``{(code_a, code_b): count}`` over the voxels of two equally shaped integer arrays (exact)."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.size == 0:
        return {}
    a64, b64 = a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)
    amin, amax, bmin, bmax = int(a64.min()), int(a64.max()), int(b64.min()), int(b64.max())
    na, nb = amax - amin + 1, bmax - bmin + 1
    if na * nb <= max(1 << 16, a.size):  # few codes (k-means maps, tissue classes): one dense bincount
        counts = np.bincount(((a64 - amin) * nb + (b64 - bmin)).ravel(), minlength=na * nb)
        nz = np.flatnonzero(counts)
        return {(int(k // nb) + amin, int(k % nb) + bmin): int(counts[k]) for k in nz}
    ua, ia = np.unique(a64, return_inverse=True)  # many or sparse codes: dense indices first
    ub, ib = np.unique(b64, return_inverse=True)
    keys, counts = np.unique(ia.ravel().astype(np.int64) * len(ub) + ib.ravel(), return_counts=True)
    return {(int(ua[k // len(ub)]), int(ub[k % len(ub)])): int(n) for k, n in zip(keys.tolist(), counts.tolist())}


def _block_tables(tissue: np.ndarray, mask: np.ndarray | None, *maps: np.ndarray) -> list[dict]:
    """One block: the (cluster, class) counts of every map against the tissue (inside ``mask`` if given)."""
    if mask is not None:
        sel = np.asarray(mask) != 0
        tissue = np.asarray(tissue)[sel]
        maps = tuple(np.asarray(m)[sel] for m in maps)
    return [_pair_counts(m, tissue) for m in maps]


def _merge_tables(*parts: list[dict]) -> list[dict]:
    out: list[dict] = [{} for _ in parts[0]]
    for p in parts:
        for dst, src in zip(out, p):
            for key, n in src.items():
                dst[key] = dst.get(key, 0) + n
    return out


def contingency_tables(maps: Sequence[Any], tissue: Any, mask: Any = None, *, fan_in: int = 8) -> list[dict]:
    """``[{(cluster, class): count}, ...]``: one contingency table per map against ``tissue``, in one pass.

    Every map (and ``mask``) is rechunked to ``tissue``'s chunks (lazily); each block is counted with
    ``np.bincount`` and the integer tables are summed in a tree of ``fan_in``, so the result is exact and the
    same for any chunking, and the shared inputs (a resampled tissue map) are computed once per block for all
    maps.

    Parameters
    ----------
    maps : sequence of volumes or arrays
        Integer (or boolean) maps of ``tissue``'s shape.
    tissue : volume or array
        The reference classes.
    mask : volume or array, optional
        Only voxels where it is non-zero count; without it all voxels (code 0 included).
    fan_in : int
        Partial tables merged per task.

    Returns
    -------
    list of dict
        One ``{(cluster, class): count}`` table per map (computed eagerly).

    Example
    -------
    >>> contingency_tables([np.array([1, 1, 2])], np.array([3, 3, 3]))
    [{(1, 3): 2, (2, 3): 1}]
    """
    import dask

    t = _as_label_data(tissue, "the tissue map")
    ms = [_as_label_data(m, "the k-means map") for m in maps]
    for m in ms:
        if tuple(m.shape) != tuple(t.shape):
            raise HelmError(
                f"the k-means map has shape {tuple(m.shape)} and the tissue map {tuple(t.shape)}",
                hint="put both on the same grid first (see reference_on_grid)",
            )
    mk = None
    if mask is not None:
        mk = _as_label_data(mask, "the mask")
        if tuple(mk.shape) != tuple(t.shape):
            raise HelmError(f"the mask has shape {tuple(mk.shape)} and the tissue map {tuple(t.shape)}")
        mk = mk.rechunk(t.chunks)
    ms = [m.rechunk(t.chunks) for m in ms]
    if not ms:
        return []
    tb = t.to_delayed()
    mb = [m.to_delayed() for m in ms]
    kb = None if mk is None else mk.to_delayed()
    parts = []
    for idx in itertools.product(*(range(len(c)) for c in t.chunks)):
        parts.append(
            dask.delayed(_block_tables, pure=True)(tb[idx], None if kb is None else kb[idx], *(b[idx] for b in mb))
        )
    if not parts:
        return [{} for _ in ms]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_tables, pure=True)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    (res,) = dask.compute(parts[0])
    return res


def adjusted_rand_from_table(table: Mapping[tuple[int, int], int]) -> float:
    """Adjusted Rand index from a contingency table ``{(cluster, class): count}``; NaN for an empty table.

    Exact integer pair counts (Python integers: no overflow for any volume), then one division; the same
    formula and special case as ``sklearn.metrics.adjusted_rand_score`` (1.0 when the two partitions agree on
    every pair, e.g. both a single cluster).

    Parameters
    ----------
    table : mapping of (int, int) to int
        Voxel counts per (cluster, class).

    Returns
    -------
    float
        The adjusted Rand index; NaN for an empty table.

    Example
    -------
    >>> adjusted_rand_from_table({(1, 7): 2, (2, 8): 3})      # the same partition, other names
    1.0
    """
    counts = [int(n) for n in table.values() if int(n) > 0]
    n = sum(counts)
    if n == 0:
        return math.nan
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for (i, j), c in table.items():
        rows[i] = rows.get(i, 0) + int(c)
        cols[j] = cols.get(j, 0) + int(c)
    sum_sq = sum(c * c for c in counts)
    tp = sum_sq - n  # ordered pairs together in both
    fp = sum(c * c for c in rows.values()) - sum_sq  # together in the clusters only
    fn = sum(c * c for c in cols.values()) - sum_sq  # together in the classes only
    tn = n * n - tp - fp - fn - n
    if fn == 0 and fp == 0:
        return 1.0
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    if den == 0:
        return math.nan
    return 2 * (tp * tn - fn * fp) / den  # int / int: correctly rounded, whatever the size


def agreement_from_table(table: Mapping[tuple[int, int], int], *, region: str = "both non-zero") -> dict:
    """ARI and best-match Dice per class from a full contingency table ``{(cluster, class): count}``.

    ``region="both non-zero"``: only voxels where both codes are non-zero count (the voxels left out are
    reported); ``"mask"``: every entry counts (the table was already restricted to a mask). Dice: for each
    non-zero class, ``2 n_ij / (|cluster i| + |class j|)`` of its best single non-zero cluster ``i`` (sizes inside
    the region); ``dice_merged`` is the Dice of the union of the clusters whose largest share lies in that class
    (each cluster assigned to one class), for maps with more clusters than classes.

    Parameters
    ----------
    table : mapping of (int, int) to int
        Voxel counts per (cluster, class), all codes (0 included).
    region : {"both non-zero", "mask"}
        Which entries count (see above).

    Returns
    -------
    dict
        As :func:`kmeans_agreement` describes.

    Example
    -------
    >>> r = agreement_from_table({(1, 2): 3, (2, 3): 1, (0, 2): 5})
    >>> r["ari"], r["dice"][2]["dice"], r["excluded"]["tissue_only"]
    (1.0, 1.0, 5)
    """
    full = {(int(i), int(j)): int(c) for (i, j), c in table.items() if int(c) > 0}
    if region == "both non-zero":
        inside = {key: c for key, c in full.items() if key[0] != 0 and key[1] != 0}
        excluded = {
            "kmeans_only": sum(c for (i, j), c in full.items() if i != 0 and j == 0),
            "tissue_only": sum(c for (i, j), c in full.items() if i == 0 and j != 0),
            "tissue_only_by_class": {j: c for (i, j), c in sorted(full.items()) if i == 0 and j != 0},
        }
    elif region == "mask":
        inside, excluded = full, None
    else:
        raise ValueError(f"region must be 'both non-zero' or 'mask', got {region!r}")
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for (i, j), c in inside.items():
        rows[i] = rows.get(i, 0) + c
        cols[j] = cols.get(j, 0) + c
    clusters = sorted(i for i in rows if i != 0)
    classes = sorted(j for j in cols if j != 0)
    # each non-zero cluster -> the class holding most of its voxels (ties: the smaller code)
    owner = {i: min((j for j in cols if (i, j) in inside), key=lambda j: (-inside[(i, j)], j)) for i in clusters}
    dice_rows = {}
    for j in classes:
        best_i, best = None, -1.0
        for i in clusters:
            d = 2.0 * inside.get((i, j), 0) / (rows[i] + cols[j])
            if d > best:
                best_i, best = i, d
        mine = [i for i in clusters if owner[i] == j]
        n_m = sum(rows[i] for i in mine)
        inter = sum(inside.get((i, j), 0) for i in mine)
        dice_rows[j] = {
            "name": TISSUE_CLASS_NAMES.get(j, f"class {j}"),
            "dice": best,
            "cluster": best_i,
            "class_voxels": cols[j],
            "cluster_voxels": rows.get(best_i, 0) if best_i is not None else 0,
            "dice_merged": 2.0 * inter / (n_m + cols[j]),
            "merged_clusters": mine,
        }
    out = {
        "ari": adjusted_rand_from_table(inside),
        "region": region,
        "voxels": sum(inside.values()),
        "clusters": clusters,
        "classes": classes,
        "dice": dice_rows,
        "contingency": [[i, j, c] for (i, j), c in sorted(full.items())],
    }
    if excluded is not None:
        out["excluded"] = excluded
    return out


def kmeans_agreement_many(kmeans_maps: Mapping[Any, Any], tissue: Any, mask: Any = None) -> dict:
    """:func:`kmeans_agreement` for several maps of one grid (e.g. ``{k: kmeans_k{k}}``) in one chunked pass.

    Parameters
    ----------
    kmeans_maps : mapping
        Key -> k-means map (volume or array).
    tissue : volume or array
        The reference classes, on the maps' grid (volumes: affines equal to 1e-4, else HelmError).
    mask : volume or array, optional
        The region compared (non-zero voxels); default where both maps are non-zero.

    Returns
    -------
    dict
        Key -> the :func:`kmeans_agreement` result.
    """
    keys = list(kmeans_maps)
    if hasattr(tissue, "attrs") and "affine" in getattr(tissue, "attrs", {}):
        for key in keys:
            m = kmeans_maps[key]
            if hasattr(m, "attrs") and "affine" in m.attrs:
                diff = _same_grid(m, tissue, atol=1e-4)
                if diff:
                    raise HelmError(
                        f"the k-means map {key} and the tissue map are not on the same grid: {diff}",
                        hint="resample the tissue map onto the working grid first (reference_on_grid)",
                    )
    tables = contingency_tables([kmeans_maps[key] for key in keys], tissue, mask)
    region = "both non-zero" if mask is None else "mask"
    return {key: agreement_from_table(t, region=region) for key, t in zip(keys, tables)}


def kmeans_agreement(kmeans_map: Any, tissue: Any, mask: Any = None) -> dict:
    """Agreement of a k-means map with a tissue-class map: adjusted Rand index and best-match Dice per class.

    Parameters
    ----------
    kmeans_map, tissue : volumes (xarray with ``attrs["affine"]``), dask or NumPy arrays of integer codes
        On the same grid (volumes: shapes and affines must agree to 1e-4, else HelmError); 0 = outside.
    mask : optional, same shape
        The region compared (non-zero voxels); default the voxels where both maps are non-zero.

    Returns
    -------
    dict
        ``ari`` (adjusted Rand index of the clusters vs the classes inside the region; NaN if it is empty),
        ``voxels`` (in the region), ``region``, ``clusters`` and ``classes`` (non-zero codes present),
        ``dice`` ``{class: {"name", "dice", "cluster", "class_voxels", "cluster_voxels", "dice_merged",
        "merged_clusters"}}`` (best single cluster per class, see :func:`agreement_from_table`),
        ``contingency`` (``[cluster, class, count]`` rows, all codes) and, without a mask, ``excluded``
        (``kmeans_only``/``tissue_only`` voxel counts outside the region).

    One chunked pass (:func:`contingency_tables`): exact integers, any chunking, nothing larger than a block
    in memory.

    Example
    -------
    >>> import numpy as np
    >>> km = np.array([0, 1, 1, 2, 2, 2]); tis = np.array([0, 3, 3, 2, 2, 0])
    >>> r = kmeans_agreement(km, tis)
    >>> r["ari"], r["voxels"], r["dice"][2]["dice"], r["dice"][2]["cluster"], r["excluded"]["kmeans_only"]
    (1.0, 4, 1.0, 2, 1)
    """
    return kmeans_agreement_many({0: kmeans_map}, tissue, mask)[0]


def reference_on_grid(tissue_vol, target_vol, *, side: str = "L", spacing: Any = None):
    """A tissue map on the scan's grid put on a run's working grid, the way the run put the scan there.

    :func:`helm_dask.orient.to_ras`, the left-right flip for a right hemisphere (``side="R"``), then
    :func:`helm_dask.resample.resample_labels` to ``spacing`` (default: the target's voxel size; the run's
    ``--spacing``, or ``"native"``) by majority vote (nearest neighbour where a working voxel holds no scan voxel
    centre, i.e. when upsampling); on the axis-aligned grid of ``--grid ras`` for a tilted scan,
    :func:`helm_dask.resample.resample_labels_to_grid`'s 3-D vote.

    Parameters
    ----------
    tissue_vol : xarray.DataArray
        Tissue classes on the scan's voxel grid.
    target_vol : xarray.DataArray
        A volume on the run's working grid.
    side : {"L", "R"}
        The hemisphere (a right one is flipped as the run flips it).
    spacing : float, sequence of float or "native", optional
        The run's working spacing; default the target's voxel size.

    Returns
    -------
    xarray.DataArray
        The tissue map on ``target_vol``'s grid, lazy; HelmError when the grids do not agree (shape, and affine
        to 1e-4 mm).
    """
    t = to_ras(tissue_vol)
    if str(side).upper() == "R":
        t = flip_left_right(t)
    if _same_grid(t, target_vol, atol=1e-4) is None:
        return t
    if spacing is None:
        spacing = [float(round(s, 6)) for s in spacing_of(affine_of(target_vol))]
    out = resample_labels(t, spacing, method="majority")
    diff = _same_grid(out, target_vol, atol=1e-4)
    ras_affine = ras_target_grid(t.shape, affine_of(t), spacing)[1]
    a_t = affine_of(target_vol)
    if diff and not is_ras_aligned(affine_of(t)) and np.allclose(ras_affine[:3, :3], a_t[:3, :3], atol=1e-6):
        # a tilted scan's --grid ras working grid (cut to the brain's box): the run's 3-D vote onto it
        return resample_labels_to_grid(t, tuple(target_vol.shape), a_t, method="majority")
    if diff:
        raise HelmError(
            f"the reference tissue map does not land on the working grid: {diff}",
            hint="give a tissue map on the scan's voxel grid (same shape and affine as the scan)",
        )
    return out
