"""The label map a sample is read from: :class:`LabelSource`, its stride pyramid and the crop centre."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from ..arrays import index_sums
from ..errors import HelmError
from ..io.convert import nifti_to_zarr
from ..io.nifti import is_nifti_path
from ..io.store import open_volume, read_meta
from ..labels import HYPOTHALAMUS
from ..volume import affine_of, spacing_of

if TYPE_CHECKING:
    import dask.array as da

# dask.array is imported where it is used, as in the rest of the generator: importing helm_dask.synth stays quick.

#: FreeSurfer hypothalamic subunit codes (both sides): the default crop centre is their centroid.
HYPOTHALAMUS_CODES = tuple(HYPOTHALAMUS)
#: The hypothalamus centroid is found at the coarsest pyramid level with voxels no larger than this (mm):
#: ~700 mm3 of hypothalamus is still > 1000 voxels there, and the pass reads a few MB instead of gigabytes.
CENTROID_SPACING_MM = 1.0


def _level_shapes(shape0: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Shapes of stride levels 0..n-1 exactly as the store's pyramid makes them (``n // 2`` per level)."""
    shapes = [tuple(int(s) for s in shape0)]
    for _ in range(1, n):
        shapes.append(tuple(s // 2 for s in shapes[-1]))
    return shapes


class LabelSource:
    """A label map and its (stored or virtual) stride pyramid, opened once for many samples.

    Build with :meth:`open` from a volume DataArray (dask-backed; never computed whole), a helm-dask
    ``.zarr`` store (its stored pyramid levels are used) or a ``.nii``/``.nii.gz`` file (imported into a
    temporary store first, removed by :meth:`close`). Level ``L`` has the affine ``A0 @ diag(2^L, 2^L, 2^L, 1)``
    (stride pyramid, no shift) and voxel ``i`` equal to level-0 voxel ``2^L i``.

    Parameters
    ----------
    data0 : dask array
        Level 0, 3-D, integer (or integral float) codes.
    affine0 : (4, 4) array
        Its voxel-to-world (RAS+ mm) affine.
    stored : sequence of dask arrays, optional
        The stored pyramid levels 0, 1, ... (default: level 0 only; coarser levels are strides of it).
    name, path : str, optional
        How the map is named in outputs and error messages.
    tmpdir : str, optional
        A folder :meth:`close` removes.

    Example
    -------
    >>> import dask.array as da
    >>> src = LabelSource(da.zeros((40, 40, 40), np.uint16, chunks=20), np.eye(4))
    >>> src.nlevels, src.shapes[2], src.auto_level(4.0), src.level(2).shape
    (6, (10, 10, 10), 1, (10, 10, 10))
    """

    def __init__(
        self,
        data0: da.Array,
        affine0: np.ndarray,
        *,
        stored: Sequence[da.Array] = (),
        name: str = "labels",
        path: str | None = None,
        tmpdir: str | None = None,
    ) -> None:
        if data0.ndim != 3:
            raise HelmError(
                f"the label map must be 3-D, got {data0.ndim}-D", path=path, hint="give a single 3-D label volume"
            )
        if not (np.issubdtype(data0.dtype, np.integer) or np.issubdtype(data0.dtype, np.floating)):
            raise HelmError(
                f"the label map has dtype {data0.dtype}, not integer codes", path=path, hint="give an integer label map"
            )
        self.data0 = data0
        self.affine0 = np.asarray(affine0, dtype=np.float64)
        self.spacing0 = spacing_of(self.affine0)
        self.stored = list(stored) or [data0]
        self.name = name
        self.path = path
        self._tmpdir = tmpdir
        # Virtual levels go on while every axis keeps at least one voxel.
        n = 1
        while min(_level_shapes(data0.shape, n + 1)[-1]) >= 1 and n < 32:
            n += 1
        self.shapes = _level_shapes(data0.shape, n)
        self._centroid: dict[tuple, np.ndarray] = {}

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, src: Any, *, tmp_dir: str | os.PathLike | None = None) -> LabelSource:
        """A :class:`LabelSource` from a DataArray, a ``.zarr`` store or a NIfTI file (or itself).

        Parameters
        ----------
        src : DataArray, path or LabelSource
            A volume (dask-backed or in memory), a helm-dask ``.zarr`` store (a path or URL) or a
            ``.nii``/``.nii.gz`` label map; a :class:`LabelSource` is returned as it is.
        tmp_dir : path, optional
            Where a NIfTI file's temporary store goes (default: the system's temporary folder).

        Returns
        -------
        LabelSource
            Call :meth:`close` (or use it as a context manager) to remove an imported NIfTI file's store.
        """
        if isinstance(src, LabelSource):
            return src
        if isinstance(src, xr.DataArray):
            import dask.array as da

            data = src.data if isinstance(src.data, da.Array) else da.from_array(np.asarray(src.data))
            return cls(data, affine_of(src), name=str(src.name or "labels"))

        p = os.fspath(src)
        if is_nifti_path(p):
            if not Path(p).exists():
                raise HelmError("label map not found", path=p, hint="check the path")
            tmp = tempfile.mkdtemp(prefix="helm-synth-", dir=tmp_dir)
            try:
                store = os.path.join(tmp, "labels.zarr")
                nifti_to_zarr(p, store, kind="labels")
                src_obj = cls._from_store(store, name=Path(p).name, path=p)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            src_obj._tmpdir = tmp
            return src_obj
        if p.rstrip("/").endswith(".zarr") or os.path.isdir(p) or "://" in p:
            read_meta(p)
            return cls._from_store(p, name=Path(p.rstrip("/")).stem, path=p)
        raise HelmError(
            "is neither a NIfTI file nor a helm-dask .zarr store",
            path=p,
            hint="give a .nii/.nii.gz label map or a .zarr store",
        )

    @classmethod
    def _from_store(cls, store: str, *, name: str, path: str) -> LabelSource:
        """A store's label map with its stored pyramid (only kind labels or mask: other kinds average theirs)."""
        meta = read_meta(store)
        if meta.get("four_d"):
            raise HelmError("is a 4-D volume, not a label map", path=path, hint="give a 3-D label map")
        if meta.get("kind") not in ("labels", "mask"):
            raise HelmError(
                f"is a store of kind {meta.get('kind')!r}, not labels (its pyramid is averaged)",
                path=path,
                hint="convert the label map with kind labels (a NIfTI with the label "
                "intent, or pass the .nii.gz directly)",
            )
        vols = [open_volume(store, level=lev) for lev in range(int(meta.get("nlevels", 1)))]
        return cls(vols[0].data, affine_of(vols[0]), stored=[v.data for v in vols], name=name, path=path)

    def close(self) -> None:
        """Remove the temporary store of an imported NIfTI file (if any)."""
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> LabelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- levels ----------------------------------------------------------------------------------------------
    @property
    def nlevels(self) -> int:
        """Number of levels (stored or virtual): they go on while every axis keeps at least one voxel."""
        return len(self.shapes)

    def level_affine(self, level: int) -> np.ndarray:
        """The voxel-to-world affine of level ``level``, ``A0 @ diag(2^L, 2^L, 2^L, 1)``.

        Parameters
        ----------
        level : int

        Returns
        -------
        ndarray
            (4, 4) float64.
        """
        f = 2.0**level
        return self.affine0 @ np.diag([f, f, f, 1.0])

    def level(self, level: int) -> da.Array:
        """Level ``level`` as a lazy dask array: a stored level, or a stride of the nearest stored one.

        Parameters
        ----------
        level : int
            0 to ``nlevels - 1``.

        Returns
        -------
        dask array
            Of shape ``shapes[level]``.
        """
        if not 0 <= level < self.nlevels:
            raise HelmError(
                f"the label map has no level {level} (levels 0..{self.nlevels - 1})",
                path=self.path,
                hint="choose --level auto or a smaller level",
            )
        m = min(level, len(self.stored) - 1)
        arr = self.stored[m]
        if level == m:
            return arr
        f = 2 ** (level - m)
        n = self.shapes[level]
        # Same voxels as the stored pyramid would hold: level-m voxel f*i, trimmed like build_pyramid.
        return arr[: n[0] * f : f, : n[1] * f : f, : n[2] * f : f]

    def auto_level(self, spacing_mm: float) -> int:
        """Coarsest level whose voxels are at most half of ``spacing_mm`` (level 0 if none is).

        Parameters
        ----------
        spacing_mm : float
            The output voxel size.

        Returns
        -------
        int
            The level ``level="auto"`` reads.
        """
        best = 0
        for lev in range(self.nlevels):
            if float(self.spacing0.max()) * 2**lev <= spacing_mm / 2 * (1 + 1e-9):
                best = lev
        return best

    # -- centre ----------------------------------------------------------------------------------------------
    def centroid_mm(self, codes: Sequence[int] = HYPOTHALAMUS_CODES) -> np.ndarray:
        """World centroid (mm) of ``codes``, by an exact integer chunked reduction at a coarse level.

        Computed eagerly once per source (cached): the coarsest level with voxels <= 1 mm, or a finer one if
        the codes vanish there. Reads that level whole (a few MB for a stored pyramid; for a lazily generated
        map every chunk of level 0 is computed once -- pass ``center=`` explicitly to avoid that).

        Parameters
        ----------
        codes : sequence of int
            The label codes (default: the hypothalamus, :data:`HYPOTHALAMUS_CODES`).

        Returns
        -------
        ndarray
            The centroid (3,), world mm; a :class:`HelmError` if no voxel has one of the codes.
        """
        key = tuple(int(c) for c in codes)
        if key in self._centroid:
            return self._centroid[key].copy()
        start = 0
        for lev in range(self.nlevels):
            if float(self.spacing0.max()) * 2**lev <= CENTROID_SPACING_MM * (1 + 1e-9):
                start = lev
        for lev in range(start, -1, -1):
            sums = index_sums(self.level(lev), key)
            if sums[0] > 0:
                ijk = sums[1:] / sums[0]
                c = self.level_affine(lev)[:3, :3] @ ijk + self.level_affine(lev)[:3, 3]
                self._centroid[key] = c
                return c.copy()
        raise HelmError(
            f"the label map has no hypothalamus labels ({key[0]}-{key[-1]}) to centre the crop on",
            path=self.path,
            hint="centre it elsewhere: --center volume or --center-mm X Y Z",
        )

    def center_mm(self, center: Any) -> np.ndarray:
        """The crop centre a configuration's ``center`` names.

        Parameters
        ----------
        center : "hypothalamus", "volume" or 3 floats
            The hypothalamus centroid (:meth:`centroid_mm`), the centre of the field of view or a world point.

        Returns
        -------
        ndarray
            (3,) float64, world mm.
        """
        if isinstance(center, str):
            if center == "hypothalamus":
                return self.centroid_mm()
            n = np.asarray(self.shapes[0], dtype=np.float64)
            return self.affine0[:3, :3] @ ((n - 1) / 2) + self.affine0[:3, 3]
        return np.asarray(center, dtype=np.float64)
