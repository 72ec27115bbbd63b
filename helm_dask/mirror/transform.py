"""The mirroring transform and its rotation maths: :class:`MirrorTransform` (the fitted rigid map, its quality
numbers and its JSON form), the Euler-angle convention (:func:`rotation_matrix`, :func:`euler_angles`), the
smallest rotation taking the plane's normal to +x (:func:`minimal_rotation`) and the lattice of candidate normals
over the whole sphere (:func:`sphere_normals`); see ``docs/method/mirror.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import HelmError

__all__ = ["MirrorTransform", "euler_angles", "minimal_rotation", "rotation_matrix", "sphere_normals"]

#: The fields a transform read from JSON must hold (the others have defaults).
_REQUIRED = (
    "matrix",
    "angles_deg",
    "translation_mm",
    "centre_mm",
    "cost",
    "fraction_across",
    "gap_mm",
    "alpha",
    "n_voxels",
)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """``R = Rx(rx) @ Ry(ry) @ Rz(rz)`` (right-handed, degrees); its first row does not depend on ``rx``.

    Parameters
    ----------
    angles_deg : 3 floats
        ``(rx, ry, rz)`` in degrees.

    Returns
    -------
    numpy.ndarray
        The 3x3 rotation matrix.

    Example
    -------
    >>> rotation_matrix((0, 0, 90)).round(6)[0].tolist()
    [0.0, -1.0, 0.0]
    """
    rx, ry, rz = (math.radians(float(a)) for a in angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    rot_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rot_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rot_x @ rot_y @ rot_z


def _normals(angles: np.ndarray) -> np.ndarray:
    """First rows of ``Ry(ry) Rz(rz)`` for an (B, 2) array of (ry, rz) in degrees."""
    b = np.radians(angles[:, 0])
    c = np.radians(angles[:, 1])
    return np.stack([np.cos(b) * np.cos(c), -np.cos(b) * np.sin(c), np.sin(b)], axis=1)


def _rigid_matrix(
    r: np.ndarray, translation_mm: Sequence[float] | np.ndarray, centre_mm: Sequence[float] | np.ndarray
) -> np.ndarray:
    """4x4 of ``v -> r (v - centre) + centre + translation``."""
    c = np.asarray(centre_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, dtype=np.float64) - r @ c
    return m


def _vec3(v: Any) -> tuple[float, float, float]:
    """Three floats from any length-3 sequence or array."""
    return float(v[0]), float(v[1]), float(v[2])


@dataclasses.dataclass
class MirrorTransform:
    """The fitted mirroring transform (world -> world, RAS+ mm) and its quality numbers.

    ``T(v) = R (v - centre) + centre + translation``, ``R = Rx(rx) Ry(ry) Rz(rz)`` from ``angles_deg``;
    ``matrix`` is the same map as a 4x4 (built from ``R`` itself: it is the reference, the angles are
    rounded). ``normal`` is the unit normal of the mirror plane in the input world frame, pointing from the
    hemisphere to the plane (the first row of ``R``); ``R`` is the smallest rotation taking it to +x
    (:func:`minimal_rotation`), since the rotation about x and the y/z translations do not change the cost
    (they are 0). ``search`` says how the normal was found (``"sphere"``: every direction, ``"grid"``: a
    local grid near +x) and ``n_normals`` how many grid normals were tried; ``alpha_search`` (``--alpha auto``
    only) the alphas tried, each one's 95th-percentile column gap and fraction across, and the alpha chosen. ``cost``,
    ``fraction_across`` (voxels with x > 0 after ``T``) and ``gap_mm`` (see ``docs/method/mirror.md``) are
    measured on all ``n_voxels`` mask voxels; ``cost_sample`` is the subsample cost per voxel that chose the
    normal. ``bbox_mm`` holds the 8 world corners of the mask's nonzero region (voxel extents included),
    ``spacing_mm`` the mask's smallest voxel size; :func:`~helm_dask.mirror.whole_brain_grid` uses both.

    Example
    -------
    >>> shift = np.eye(4); shift[0, 3] = -4.0
    >>> t = MirrorTransform(shift, (0, 0, 0), (-4, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 5e-4, 1)
    >>> t.normal, t.apply([[1.0, 2.0, 3.0]]).tolist()
    ((1.0, 0.0, 0.0), [[-3.0, 2.0, 3.0]])
    """

    matrix: np.ndarray
    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    cost: float
    fraction_across: float
    gap_mm: float
    alpha: float
    n_voxels: int
    n_sample: int = 0
    cost_sample: float = float("nan")
    gap_quantile: float = 0.5
    bbox_mm: np.ndarray | None = None
    spacing_mm: float | None = None
    normal: tuple[float, float, float] | None = None
    search: str | None = None
    n_normals: int = 0
    alpha_search: dict | None = None  # --alpha auto: every alpha tried, its gap and fraction across, the choice

    def __post_init__(self) -> None:
        if self.normal is None:  # transforms written before the field existed: the matrix holds it
            n = np.asarray(self.matrix, dtype=np.float64)[0, :3]
            self.normal = _vec3(n / np.linalg.norm(n))

    def apply(self, points_mm: Any) -> np.ndarray:
        """World points after ``T``.

        Parameters
        ----------
        points_mm : array-like, N x 3
            World points (mm).

        Returns
        -------
        numpy.ndarray
            N x 3 float64, the points after ``T``.
        """
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_dict(self) -> dict:
        """The transform as a JSON-able dict.

        Returns
        -------
        dict
            Every field (4x4 as nested lists, angles in degrees, translation in mm) and ``convention``, a
            sentence stating how the numbers define ``T``.
        """
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "alpha_search" and v is None:
                continue  # a fixed alpha: transform.json stays as it was before --alpha auto existed
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, tuple):
                v = [float(x) for x in v]
            d[f.name] = v
        d["convention"] = (
            "T(v) = R (v - centre_mm) + centre_mm + translation_mm, R = Rx(rx) Ry(ry) Rz(rz), "
            "angles_deg = (rx, ry, rz); matrix = the same map as 4x4 world -> world (RAS+ mm); "
            "mirror plane x = 0; normal = the plane's unit normal in the input world frame "
            "(first row of R), R = the smallest rotation taking it to +x"
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MirrorTransform:
        """Inverse of :meth:`to_dict`.

        Parameters
        ----------
        d : mapping
            As :meth:`to_dict` writes it; unknown keys are ignored.

        Returns
        -------
        MirrorTransform

        Raises
        ------
        HelmError
            When a required field is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        missing = set(_REQUIRED) - set(kw)
        if missing:
            raise HelmError(
                f"the mirror transform lacks {sorted(missing)}",
                hint="re-run the mirroring fit to write a complete transform.json",
            )
        kw["matrix"] = np.asarray(kw["matrix"], dtype=np.float64).reshape(4, 4)
        for k in ("angles_deg", "translation_mm", "centre_mm", "normal"):
            if kw.get(k) is not None:
                kw[k] = tuple(float(x) for x in kw[k])
        if kw.get("bbox_mm") is not None:
            kw["bbox_mm"] = np.asarray(kw["bbox_mm"], dtype=np.float64).reshape(8, 3)
        return cls(**kw)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (e.g. ``transform.json``).

        Parameters
        ----------
        path : str or path
            The file to write.
        """
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> MirrorTransform:
        """Read a transform written by :meth:`save_json`.

        Parameters
        ----------
        path : str or path
            The JSON file.

        Returns
        -------
        MirrorTransform

        Raises
        ------
        HelmError
            When the file cannot be read or lacks a required field (the error names the file).
        """
        try:
            with open(path) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as exc:
            raise HelmError(
                f"cannot read the mirror transform ({exc})",
                path=path,
                hint="check the path, or re-run the mirroring fit",
            ) from None
        try:
            return cls.from_dict(d)
        except HelmError as exc:
            raise HelmError(exc.message, path=path, hint=exc.hint) from None


def sphere_normals(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the whole sphere (a Fibonacci lattice), deterministic.

    Point ``i`` has ``z = 1 - (2 i + 1) / n`` and longitude ``i`` times the golden angle: equal areas per
    point, nearest neighbours about ``sqrt(4 pi / n)`` rad apart (4.5 degrees for 2000 points).

    Parameters
    ----------
    n : int
        Number of points.

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` float64 unit vectors.

    Example
    -------
    >>> p = sphere_normals(500)
    >>> p.shape, bool(np.allclose(np.linalg.norm(p, axis=1), 1.0)), bool(abs(p.mean(axis=0)).max() < 0.01)
    ((500, 3), True, True)
    """
    i = np.arange(int(n), dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * (math.pi * (3.0 - math.sqrt(5.0)))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def minimal_rotation(normal: Sequence[float] | np.ndarray) -> np.ndarray:
    """The smallest rotation ``R`` taking the unit vector ``normal`` to +x (``R @ normal = e_x``).

    Its axis is ``normal x e_x`` (perpendicular to x), its angle the angle between the two; its first row is
    ``normal`` itself. For ``normal = -x`` (every 180 degree turn about an axis in the y-z plane is minimal)
    it is the turn about z, ``diag(-1, -1, 1)``, the limit when ``normal`` approaches -x from the y side.

    Parameters
    ----------
    normal : 3 floats
        The direction (normalised here).

    Returns
    -------
    numpy.ndarray
        The 3x3 rotation matrix.

    Example
    -------
    >>> r = minimal_rotation([0.0, 1.0, 0.0])              # +y -> +x: a quarter turn about -z
    >>> r.round(12).tolist()
    [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    n = n / np.linalg.norm(n)
    nx, ny, nz = (float(v) for v in n)
    s = ny * ny + nz * nz
    if s == 0.0:
        return np.eye(3) if nx > 0 else np.diag([-1.0, -1.0, 1.0])
    # Rodrigues for the axis n x e_x: R = I + [v]x + [v]x^2 / (1 + nx), v = (0, nz, -ny). 1 + nx is
    # computed as s / (1 - nx) when nx < 0: no cancellation near -x, so R stays orthonormal there too.
    h = 1.0 / (1.0 + nx) if nx >= 0 else (1.0 - nx) / s
    return (
        np.array([[nx, ny, nz], [-ny, 1.0 - ny * ny * h, -ny * nz * h], [-nz, -ny * nz * h, 1.0 - nz * nz * h]]) + 0.0
    )  # + 0.0: no -0.0


def euler_angles(r: np.ndarray) -> tuple[float, float, float]:
    """``(rx, ry, rz)`` degrees with ``rotation_matrix((rx, ry, rz)) == r`` (to rounding).

    At ``ry = +-90`` degrees (gimbal lock) ``rz`` is set to 0.

    Parameters
    ----------
    r : numpy.ndarray
        A 3x3 rotation matrix.

    Returns
    -------
    tuple of 3 floats
        ``(rx, ry, rz)`` in degrees (never -0.0).

    Example
    -------
    >>> [round(a, 9) for a in euler_angles(rotation_matrix((10.0, -20.0, 30.0)))]
    [10.0, -20.0, 30.0]
    """
    r = np.asarray(r, dtype=np.float64)
    ry = math.asin(max(-1.0, min(1.0, float(r[0, 2]))))
    if math.cos(ry) > 1e-12:
        rz = math.atan2(-float(r[0, 1]), float(r[0, 0]))
    else:
        rz = 0.0
    rx_m = r @ rotation_matrix((0.0, math.degrees(ry), math.degrees(rz))).T
    rx = math.atan2(float(rx_m[2, 1]), float(rx_m[1, 1]))
    return _vec3([math.degrees(a) + 0.0 for a in (rx, ry, rz)])  # + 0.0: no -0.0 in the JSON
