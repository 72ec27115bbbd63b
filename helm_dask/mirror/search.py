"""The search for the mirror plane's normal on the subsample of mask voxels: the cost of every candidate normal
with its best x translation in closed form (:func:`_sample_cost`), then Nelder-Mead in the tangent plane of the
sphere from the best distinct basins, first on a prefix of the sample, then on all of it
(:func:`_search_normal`); see ``docs/method/mirror.md``.
"""

from __future__ import annotations

import math

import numpy as np

_N_COARSE = 20_000  # sample points used on the coarse grid of normals (all n_sample for the refinement)
_N_STARTS = 4  # distinct basins of the coarse grid refined on the prefix (the best then on all)
_BATCH = 8  # normals evaluated together: (batch, n) arrays; small batches are the fastest (BLAS)
#: The six world axis directions, tried before the sphere lattice: a medial face aligned with the voxel
#: grid (phantoms, resliced scans) is then found exactly, and wins ties.
_AXES = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])


def _sample_cost(points_t: np.ndarray, normals: np.ndarray, alpha: float) -> np.ndarray:
    """Cost per voxel on the (centred) sample points, given as a contiguous (3, n) array, for each unit normal
    (row of ``normals``), each with its best t_x (the closed-form quantile)."""
    n = points_t.shape[1]
    m = min(n, int(math.floor(alpha * n)) + 1)
    normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    total = normals @ points_t.sum(axis=1)  # sum of u, linear in the normal: no pass over u
    out = np.empty(len(normals))
    for s in range(0, len(normals), _BATCH):  # batches keep the (batch, n) arrays small
        u = np.partition(normals[s : s + _BATCH] @ points_t, n - m, axis=1)  # (batch, n)
        q = u[:, n - m]  # the m-th largest: the best t_x in closed form
        above = (u[:, n - m + 1 :] - q[:, None]).sum(axis=1)  # after the partition: exactly those >= q
        out[s : s + _BATCH] = (above - alpha * (total[s : s + _BATCH] - n * q)) / n
    return out


def _tangent_basis(n0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing ``n0`` to an orthonormal frame (a fixed rule: deterministic)."""
    axis = np.zeros(3)
    axis[int(np.argmin(np.abs(n0)))] = 1.0  # the world axis least aligned with n0
    e1 = np.cross(n0, axis)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(n0, e1)


def _normal_at(frame: tuple, ab_deg: np.ndarray) -> np.ndarray:
    """The unit normal ``(a, b)`` degrees away from ``n0`` along the frame's tangent axes (exponential map:
    geodesic distance ``sqrt(a^2 + b^2)``; exactly ``n0`` at (0, 0), no pole anywhere)."""
    n0, e1, e2 = frame
    a, b = (math.radians(float(v)) for v in ab_deg)
    theta = math.hypot(a, b)
    if theta == 0.0:
        return n0.copy()
    t = (a * e1 + b * e2) / theta
    n = math.cos(theta) * n0 + math.sin(theta) * t
    return n / np.linalg.norm(n)


def _refine(
    pts_t: np.ndarray, n0: np.ndarray, alpha: float, step_deg: float, xatol: float, fatol: float
) -> tuple[np.ndarray, float]:
    """Nelder-Mead over the two tangent angles around ``n0`` (simplex edge ``step_deg``); returns the best
    normal and its cost. The start is kept unless something is strictly better (exact ties stay exact)."""
    from scipy.optimize import minimize

    frame = (n0, *_tangent_basis(n0))

    def fun(ab: np.ndarray) -> float:
        return float(_sample_cost(pts_t, _normal_at(frame, ab)[None], alpha)[0])

    start = fun(np.zeros(2))
    simplex = np.array([[0.0, 0.0], [step_deg, 0.0], [0.0, step_deg]])
    res = minimize(
        fun,
        np.zeros(2),
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": xatol, "fatol": fatol, "maxiter": 600},
    )
    if float(res.fun) < start:
        return _normal_at(frame, res.x), float(res.fun)
    return n0.copy(), start


def _distinct_best(normals: np.ndarray, costs: np.ndarray, k: int, min_sep_deg: float) -> list[int]:
    """Indices of the ``k`` cheapest normals that are pairwise more than ``min_sep_deg`` apart (one start per
    basin rather than k neighbours of one grid minimum); ties keep the grid order."""
    cos_sep = math.cos(math.radians(min_sep_deg))
    picked: list[int] = []
    for idx in np.lexsort((np.arange(len(costs)), costs)):
        if all(float(normals[idx] @ normals[j]) < cos_sep for j in picked):
            picked.append(int(idx))
            if len(picked) == k:
                break
    return picked


def _search_normal(
    points: np.ndarray, alpha: float, candidates: np.ndarray, spacing_deg: float, refine: bool
) -> tuple[np.ndarray, float]:
    """The plane normal minimising the sample cost: the candidate normals on a prefix of the sample, then
    Nelder-Mead from the best distinct ones (on the prefix), then from the best result (and a close rival
    minimum) on the whole sample. Returns the unit normal and its cost per voxel on the whole sample."""
    from threadpoolctl import threadpool_limits

    # (batch, 3) @ (3, n) products: multithreaded BLAS gains nothing on them and, next to dask workers on the
    # same cores, loses up to 5x (measured); one thread also keeps the same kernel on every run
    with threadpool_limits(limits=1, user_api="blas"):
        return _search_normal_1(points, alpha, candidates, spacing_deg, refine)


def _search_normal_1(
    points: np.ndarray, alpha: float, candidates: np.ndarray, spacing_deg: float, refine: bool
) -> tuple[np.ndarray, float]:
    # the points are in hash order, so any prefix is itself a uniform sample: the coarse grid only has to
    # find the basins, a smaller prefix does that at a fraction of the cost
    pts = np.ascontiguousarray(points.T)
    coarse = np.ascontiguousarray(pts[:, :_N_COARSE])
    costs = _sample_cost(coarse, candidates, alpha)
    starts = _distinct_best(candidates, costs, _N_STARTS, 2.5 * spacing_deg)
    if not refine:
        best = candidates[starts[0]].copy()
        return best, float(_sample_cost(pts, best[None], alpha)[0])
    # stage 1, on the prefix: one local search per basin (the V-shaped minimum of a flat face is narrow, so
    # the simplex starts at half the grid spacing)
    stage1 = [_refine(coarse, candidates[i], alpha, 0.5 * spacing_deg, 1e-3, 1e-12) for i in starts]
    order = sorted(range(len(stage1)), key=lambda i: (stage1[i][1], i))
    # stage 2, on the whole sample, from the best minimum, and from the runner-up too when it is another
    # minimum (> 1 degree away) of nearly the same cost (within 5%: the prefix may rank those wrongly); starts
    # in one wide basin (the usual case) converge together and are refined once
    first = stage1[order[0]]
    runs = [first[0]] + [
        stage1[i][0]
        for i in order[1:2]
        if float(stage1[i][0] @ first[0]) < math.cos(math.radians(1.0))
        and stage1[i][1] <= first[1] + 0.05 * abs(first[1])
    ]
    best, best_cost = None, math.inf
    for n0 in runs:
        n, c = _refine(pts, n0, alpha, max(0.05, 0.05 * spacing_deg), 1e-6, 1e-13)
        if c < best_cost:
            best, best_cost = n, c
    return best, best_cost
