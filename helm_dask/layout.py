"""Every path of a subject's output folder, named once: the Zarr store and its volumes, the JSON records, the NIfTI
exports, the colour table, the QC page and the published dataset's ``--layout helm`` folders. The pipeline, QC,
``compare`` and ``batch`` all build paths here (paths or fsspec URLs; nothing is read or written).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .io.location import is_url, join

__all__ = [
    "HELM_LAYOUT",
    "RECORDS",
    "STORE",
    "SubjectLayout",
    "store_group_json",
]

#: The subject's Zarr store (a group holding one helm-dask volume per stage output).
STORE = "helm.zarr"
#: JSON records of a subject folder: what the run did, and the models the stages fitted.
RECORDS = {
    "run": "run.json",
    "bias_model": "bias_model.json",
    "kmeans": "kmeans.json",
    "transform": "transform.json",
}
#: ``--layout helm``: the published dataset's folders (under OUT) -> the subject's exports they hold.
HELM_LAYOUT: dict[str, list[str]] = {
    "preprocessed": ["preprocessed.nii.gz"],
    "hypothalamus": ["hypothalamus.nii.gz"],
    "whole_brain_segmentation": ["kmeans_k{k}.nii.gz"],
    "label_maps": ["label_map_k{k}.nii.gz"],
}


def store_group_json(subject: str, stores: Iterable[str]) -> str:
    """The ``zarr.json`` that makes the subject's store (:data:`STORE`) a Zarr v3 group of its volumes.

    ``zarr.open_group("OUT/<subject>/helm.zarr")`` then opens it and lists every volume as a member; the
    attributes name the subject and the volumes the run has written.

    Parameters
    ----------
    subject : str
        The subject's name.
    stores : iterable of str
        The volumes written so far (listed sorted, once each).

    Returns
    -------
    str
        The JSON text.

    Examples
    --------
    >>> json.loads(store_group_json("s1", ["mask", "image_ws", "mask"]))["attributes"]["helm_dask"]["stores"]
    ['image_ws', 'mask']
    """
    meta = {"subject": subject, "stores": sorted(set(stores))}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"helm_dask": meta}}, indent=2) + "\n"


@dataclass(frozen=True)
class SubjectLayout:
    """The paths of one subject's outputs under ``OUT/<subject>/``.

    Parameters
    ----------
    out : str
        The output root (``--out``): a local path or a URL.
    subject : str
        The subject's folder name.

    Examples
    --------
    >>> lay = SubjectLayout("/data/out", "s1")
    >>> lay.volume("preprocessed"), lay.nifti("label_map_k6")
    ('/data/out/s1/helm.zarr/preprocessed', '/data/out/s1/label_map_k6.nii.gz')
    >>> lay.helm_links([6])[-1]
    ('/data/out/s1/label_map_k6.nii.gz', '/data/out/label_maps/s1_k6.nii.gz')
    """

    out: str
    subject: str

    @classmethod
    def of_folder(cls, subject_dir: str | Path) -> SubjectLayout:
        """The layout of an existing subject folder (its parent is the output root)."""
        p = str(subject_dir).rstrip("/")
        if is_url(p):
            return cls(posixpath.dirname(p), posixpath.basename(p))
        path = Path(p)
        return cls(str(path.parent), path.name)

    @property
    def dir(self) -> str:
        """The subject folder."""
        return join(str(self.out), self.subject)

    @property
    def store(self) -> str:
        """The subject's Zarr store."""
        return join(self.dir, STORE)

    @property
    def store_group(self) -> str:
        """The store's group metadata (``helm.zarr/zarr.json``, :func:`store_group_json`)."""
        return join(self.store, "zarr.json")

    def volume(self, name: str) -> str:
        """A volume (stage output) in the store, e.g. ``preprocessed`` or ``hemi_k6``."""
        return join(self.store, name)

    def file(self, filename: str) -> str:
        """A file in the subject folder."""
        return join(self.dir, filename)

    def record(self, which: str) -> str:
        """A JSON record: ``run``, ``bias_model``, ``kmeans`` or ``transform`` (:data:`RECORDS`)."""
        return self.file(RECORDS[which])

    def nifti(self, name: str) -> str:
        """The NIfTI export of a volume: ``<name>.nii.gz`` in the subject folder."""
        return self.file(f"{name}.nii.gz")

    @property
    def lut(self) -> str:
        """The FreeSurfer colour table of the label maps."""
        return self.file("lut.txt")

    @property
    def qc_dir(self) -> str:
        """The QC page's folder."""
        return self.file("qc")

    def helm_links(self, ks: Iterable[int]) -> list[tuple[str, str]]:
        """``(export, link)`` pairs of ``--layout helm``: ``OUT/<folder>/<subject>[_k{k}].nii.gz``."""
        pairs = []
        for folder, patterns in HELM_LAYOUT.items():
            for pat in patterns:
                for k in ks if "{k}" in pat else [None]:
                    suffix = "" if k is None else f"_k{k}"
                    link = join(str(self.out), folder, f"{self.subject}{suffix}.nii.gz")
                    pairs.append((self.file(pat.format(k=k)), link))
        return pairs
