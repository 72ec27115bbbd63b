"""One subject's output folder with the bookkeeping that makes stages resumable: stage keys, up-to-date checks,
atomic volume and JSON writes, NIfTI exports that carry their key."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import HelmError
from ..io import location
from ..io import store as io_store
from ..io.convert import save_nifti
from ..io.nifti import file_sha256, read_nifti_provenance
from ..io.regions import release_chunk_caches
from ..io.store import open_volume, read_meta, save_volume
from ..labels import label_colours
from ..layout import SubjectLayout, store_group_json
from ..registry import STAGE_VERSIONS
from ..volume import like, provenance_record
from .params import RunParams


def stage_key(stage: str, params: dict, upstream: dict[str, str]) -> str:
    """Hash of what makes a stage's output: its parameters, its algorithm version
    (:data:`helm_dask.registry.STAGE_VERSIONS`), the package version and the keys of the stages it reads.

    Parameters
    ----------
    stage : str
        The stage's name.
    params : dict
        Its parameters (JSON-serialisable; other values by ``str``).
    upstream : dict
        Stage name -> key of every stage whose stores it reads.

    Returns
    -------
    str
        20 hexadecimal digits.

    Examples
    --------
    >>> len(stage_key("bias", {"method": "dct-mixture"}, {"resample": "0" * 20}))
    20
    """
    blob = json.dumps(
        {
            "stage": stage,
            "params": params,
            "upstream": upstream,
            "version": __version__,
            "stage_version": STAGE_VERSIONS[stage],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def json_default(o: Any) -> Any:
    """JSON for NumPy arrays and scalars (lists and Python numbers); anything else as its ``str``.

    Parameters
    ----------
    o : object
        What ``json.dumps`` cannot serialise.

    Returns
    -------
    object
        A JSON-serialisable stand-in.

    Examples
    --------
    >>> json.dumps({"a": np.arange(2), "b": np.float32(0.5)}, default=json_default)
    '{"a": [0, 1], "b": 0.5}'
    """
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def fingerprint_input(
    path: str, cache: dict | None, storage_options: dict | None = None, *, verify: bool = False
) -> str:
    """SHA-256 of an input file; reuses a cached value when size and mtime (ETag on S3) are unchanged, unless
    ``verify`` (``--verify-inputs``: a file replaced by another of the same size and mtime is then noticed).

    Parameters
    ----------
    path : str
        The input file (a path or a URL).
    cache : dict, optional
        ``{"stamp": ..., "sha256": ...}`` recorded when the file was last imported.
    storage_options : dict, optional
        fsspec options for a URL.
    verify : bool
        Always hash the file.

    Returns
    -------
    str
        The hexadecimal SHA-256.
    """
    stamp = location.stamp(path, storage_options)
    if not verify and cache and cache.get("stamp") == stamp and cache.get("sha256"):
        return cache["sha256"]
    return file_sha256(path, storage_options=storage_options)


class Subject:
    """One subject's output folder and store, with the bookkeeping that makes stages resumable."""

    def __init__(self, params: RunParams, *, quiet: bool = False, log: Callable[[str], None] | None = None):
        self.p = params
        self.name = params.subject_name()
        self.so = params.storage_options
        self.layout = SubjectLayout(params.out, self.name)
        self.dir = self.layout.dir
        self.store = self.layout.store
        self.quiet = quiet
        self._log = log
        self.keys: dict[str, str] = {}
        self.info: dict[str, Any] = {"subject": self.name, "stages": {}}
        self._stores: set[str] | None = None  # the volumes helm.zarr/zarr.json lists, once read

    # -- logging ------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        elif not self.quiet:
            print(f"[{self.name}] {msg}", flush=True)

    # -- outputs ------------------------------------------------------------------------------------------------
    def ensure_store(self) -> None:
        """Create the subject's store folder, and read the volumes its group metadata lists (once per run)."""
        if self._stores is not None:
            return
        location.makedirs(self.store, self.so)
        try:
            doc = json.loads(location.read_text(self.layout.store_group, self.so))
            self._stores = set(doc["attributes"]["helm_dask"]["stores"])
        except (OSError, ValueError, KeyError, TypeError, HelmError):
            self._stores = set()  # missing (a new subject, or a store from before it was a group) or unreadable

    def record_stores(self, names) -> None:
        """Make the store a Zarr v3 group listing its volumes (``helm.zarr/zarr.json``, so that
        ``zarr.open_group`` opens it): written atomically once a volume exists, rewritten only when it changes
        (a run that fails before its first volume leaves no file behind)."""
        self.ensure_store()
        assert self._stores is not None
        if not (self._stores | set(names)):
            return
        text = store_group_json(self.name, self._stores | set(names))
        try:
            if location.read_text(self.layout.store_group, self.so) == text:
                self._stores |= set(names)
                return
        except (OSError, HelmError):
            pass  # missing: write it
        location.write_text_atomic(self.layout.store_group, text, self.so)
        self._stores |= set(names)

    def path(self, filename: str) -> str:
        """A file in the subject folder (a path or a URL)."""
        return self.layout.file(filename)

    def vpath(self, name: str) -> str:
        return self.layout.volume(name)

    def label_colours(self) -> dict:
        """The run's label table as the label stores' OME ``image-label`` colours (codes -> name, RGBA)."""
        return label_colours(self.p.label_table, self.p.ks)

    def open(self, name: str):
        return open_volume(self.vpath(name), storage_options=self.so)

    def volume_ok(self, name: str, key: str) -> bool:
        try:  # read_meta refuses missing and unfinished volumes
            return read_meta(self.vpath(name), storage_options=self.so).get("stage_key") == key
        except HelmError:
            return False

    def read_json(self, path: str) -> dict:
        return json.loads(location.read_text(path, self.so))

    def json_ok(self, path: str, key: str) -> bool:
        try:
            return self.read_json(path).get("stage_key") == key
        except (OSError, ValueError, HelmError):
            return False

    def nifti_ok(self, path: str, key: str) -> bool:
        if not location.exists(path, self.so):
            return False
        try:
            prov = read_nifti_provenance(path, storage_options=self.so)
        except HelmError:
            return False
        return prov is not None and bool(prov) and prov.get("stage_key") == key

    def save(self, name: str, vol, key: str, stage: str, params: dict, batch_chunks: int | None = None) -> Any:
        """Write a volume into the subject store (atomically) and return it reopened lazily from disk."""
        self.ensure_store()
        vol = like(vol, vol.data, step=provenance_record(stage, params, self.input_checksums()))
        try:
            save_volume(
                vol,
                self.vpath(name),
                chunks=self.p.chunks,
                overwrite=True,
                extra={"stage_key": key, "stage": stage},
                storage_options=self.so,
                batch_chunks=batch_chunks,
                label_colours=self.label_colours(),
            )
        finally:
            # the decoded source chunks cached for this write's region tasks would otherwise stay in every
            # worker through the next stages (measured: ~0.5 GB per worker after a resample)
            release_chunk_caches()
        return self.open(name)

    def save_many(self, vols: dict, key: str, stage: str, params: dict, reflect: dict | None = None) -> dict:
        """Write several volumes from one shared Dask computation (inputs read once); skip those already done.

        ``reflect``: ``{name: lut}`` for volumes whose second x half mirrors the first
        (:func:`helm_dask.io.store.save_volumes`)."""
        self.ensure_store()
        todo = {
            self.vpath(n): like(v, v.data, step=provenance_record(stage, params, self.input_checksums()))
            for n, v in vols.items()
            if not self.volume_ok(n, key)
        }
        if todo:
            try:
                io_store.save_volumes(
                    todo,
                    chunks=self.p.chunks,
                    overwrite=True,
                    extra={"stage_key": key, "stage": stage},
                    storage_options=self.so,
                    label_colours=self.label_colours(),
                    reflect={self.vpath(n): lut for n, lut in (reflect or {}).items() if lut is not None},
                )
            finally:
                release_chunk_caches()  # as in save()
        return {n: self.open(n) for n in vols}

    def write_json(self, path: str, payload: dict, key: str) -> None:
        payload = dict(payload, stage_key=key, version=__version__)
        location.write_text_atomic(path, json.dumps(payload, indent=2, default=json_default), self.so)

    def export(self, vol, filename: str, key: str, *, dtype=None) -> str:
        """NIfTI export of a stored volume, skipped when the file already carries this key (or with --no-nifti)."""
        path = self.path(filename)
        if not self.p.nifti or self.nifti_ok(path, key):
            return path
        prov = {
            "stage_key": key,
            "subject": self.name,
            "version": __version__,
            "provenance": vol.attrs.get("provenance", []),
            "inputs": self.input_checksums(),
        }
        self.log(f"export {filename}: writing")
        t0 = time.perf_counter()
        save_nifti(vol, path, dtype=dtype, overwrite=True, provenance=prov, quiet=self.quiet, storage_options=self.so)
        self.log(f"export {filename}: written in {time.perf_counter() - t0:.1f}s")
        return path

    # -- inputs -------------------------------------------------------------------------------------------------
    def input_checksums(self) -> dict[str, str]:
        return dict(self.info.get("inputs", {}))
