"""Where the viewers put a run's stores: every store of ``<out>/<subject>/helm.zarr/`` read through ome-zarr-py's
``Reader`` and napari-ome-zarr's reader (headless), the transform each derives applied to level 0's corner and
centre voxel centres and compared with the store's exact affine (``attrs["helm_dask"]["affine"]``).

Used by ``tests/test_ome_placement.py``; reusable on any output folder (with ``tests/`` on ``sys.path``)::

    from ome_placement import check_run, failures, report
    results = check_run("OUT")
    print(report(results))
    assert not failures(results), failures(results)

The tolerances are the README's promise: an axis-aligned store (``ome_placement == "exact"``) within
:data:`VOXEL_TOL` voxel at every corner; a tilted one with its centre within :data:`VOXEL_TOL` voxel and its worst
corner no further than the bound the store states (``ome_placement_error_mm``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Tolerance, in voxels, of an exact placement and of every centre.
VOXEL_TOL = 0.01
#: Slack (mm) on the stated worst-corner bound: the readers compose scale and translation in float64.
BOUND_SLACK_MM = 1e-6


def volume_stores(out_dir) -> list[Path]:
    """Every helm-dask volume store of an output folder (``*/helm.zarr/*``, also nested ones), sorted.

    A store is a folder whose ``zarr.json`` has ``helm_dask`` attributes; temporaries (``.name.tmp-...``) are
    skipped.
    """
    found = []
    for meta in sorted(Path(out_dir).glob("*/helm.zarr/**/zarr.json")):
        d = meta.parent
        if any(part.startswith(".") for part in d.parts[-3:]):
            continue
        attrs = json.loads(meta.read_text()).get("attributes", {})
        if isinstance(attrs.get("helm_dask"), dict) and attrs["helm_dask"].get("format") == "helm-dask-volume":
            found.append(d)
    return found


def probe_points(shape) -> np.ndarray:
    """Level 0's eight corner voxel centres and its centre, as (9, 3) voxel indices."""
    n = np.asarray(shape[-3:], dtype=np.float64)
    corners = [np.array(c) * (n - 1) for c in itertools.product((0.0, 1.0), repeat=3)]
    return np.array(corners + [(n - 1) / 2.0])


def _scale_translation(transforms: list, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Compose OME 0.5 ``scale`` / ``translation`` transforms (in order) into one scale and translation."""
    scale, trans = np.ones(ndim), np.zeros(ndim)
    for t in transforms:
        if t["type"] == "scale":
            scale, trans = scale * np.asarray(t["scale"]), trans * np.asarray(t["scale"])
        elif t["type"] == "translation":
            trans = trans + np.asarray(t["translation"])
        else:
            raise AssertionError(f"unexpected OME 0.5 transform {t['type']!r}")
    return scale[-3:], trans[-3:]


def ome_zarr_py_view(store) -> dict:
    """What ome-zarr-py's ``Reader`` derives for the store's first node: level 0's scale and translation (its
    ``coordinateTransformations``), whether it is a label image, its colours and properties."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    node = next(iter(Reader(parse_url(str(store)))()))
    transforms = node.metadata["coordinateTransformations"][0]
    scale, trans = _scale_translation(transforms, len(node.data[0].shape))
    return {
        "matrix": _matrix(scale, trans),
        "label": node.load(Label) is not None,
        "colours": dict(node.metadata.get("color") or {}),
        "properties": dict(node.metadata.get("properties") or {}),
        "name": node.metadata.get("name"),
        "shapes": [tuple(d.shape) for d in node.data],
    }


def napari_view(store) -> dict:
    """What napari-ome-zarr's reader gives napari for the store (headless): the layer type and the index-to-world
    matrix its ``scale``, ``translate`` and ``affine`` keywords make (napari applies ``affine`` after
    ``scale``/``translate``)."""
    from napari_ome_zarr import napari_get_reader

    with contextlib.redirect_stdout(io.StringIO()):  # the reader prints the group's attributes
        layers = napari_get_reader(str(store))(str(store))
    assert len(layers) == 1, f"{store}: napari-ome-zarr made {len(layers)} layers"
    data, kw, layer_type = layers[0]
    scale = np.asarray(kw.get("scale", np.ones(3)), dtype=np.float64)[-3:]
    trans = np.asarray(kw.get("translate", np.zeros(3)), dtype=np.float64)[-3:]
    m = _matrix(scale, trans)
    if kw.get("affine") is not None:
        a = np.asarray(getattr(kw["affine"], "affine_matrix", kw["affine"]), dtype=np.float64)
        m = a[-4:, -4:] @ m
    return {"matrix": m, "type": layer_type, "colormap": kw.get("colormap"), "shapes": [tuple(d.shape) for d in data]}


def _matrix(scale, trans) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = trans
    return m


def _apply(m: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ m[:3, :3].T + m[:3, 3]


@dataclass
class StoreCheck:
    """One store's placement by each reader, against its exact affine."""

    store: Path
    kind: str
    placement: str
    stated_error_mm: float
    voxel_mm: float
    errors_mm: dict = field(default_factory=dict)  # reader -> (centre error, worst corner error) in mm
    label_layers: dict = field(default_factory=dict)  # reader -> whether it is a label layer with colours
    problems: list = field(default_factory=list)


def check_store(store, readers=("ome-zarr-py", "napari-ome-zarr")) -> StoreCheck:
    """Place level 0's corners and centre with each reader's transform; compare with the exact affine.

    Parameters
    ----------
    store : path
        A helm-dask volume store.
    readers : tuple of str
        ``"ome-zarr-py"`` and/or ``"napari-ome-zarr"``.

    Returns
    -------
    StoreCheck
        ``problems`` lists every broken promise (empty when the store is where it says).
    """
    import zarr

    meta = dict(zarr.open_group(str(store), mode="r").attrs["helm_dask"])
    affine = np.asarray(meta["affine"], dtype=np.float64)
    shape = tuple(zarr.open_array(str(store), path="0", mode="r").shape)
    pts = probe_points(shape)
    truth = _apply(affine, pts)
    voxel = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).min())
    chk = StoreCheck(
        Path(store),
        meta["kind"],
        meta.get("ome_placement", "?"),
        float(meta.get("ome_placement_error_mm", np.nan)),
        voxel,
    )
    views = {}
    if "ome-zarr-py" in readers:
        views["ome-zarr-py"] = ome_zarr_py_view(store)
    if "napari-ome-zarr" in readers:
        views["napari-ome-zarr"] = napari_view(store)
    for reader, view in views.items():
        err = np.linalg.norm(_apply(view["matrix"], pts) - truth, axis=1)
        centre, worst = float(err[-1]), float(err[:-1].max())
        chk.errors_mm[reader] = (centre, worst)
        _judge(chk, reader, centre, worst)
        if chk.kind in ("labels", "mask"):
            is_label = (view["label"] and bool(view["colours"])) if reader == "ome-zarr-py" else None
            if reader == "napari-ome-zarr":
                is_label = view["type"] == "labels" and bool(view["colormap"])
            chk.label_layers[reader] = is_label
            if not is_label:
                chk.problems.append(f"{reader}: not a label layer with colours")
    return chk


def _judge(chk: StoreCheck, reader: str, centre: float, worst: float) -> None:
    tol = VOXEL_TOL * chk.voxel_mm
    if chk.placement == "exact":
        if worst > tol:
            chk.problems.append(f"{reader}: exact store off by {worst:.4g} mm at a corner (> {tol:.3g} mm)")
        return
    if centre > tol:
        chk.problems.append(f"{reader}: centre off by {centre:.4g} mm (> {tol:.3g} mm)")
    if not worst <= chk.stated_error_mm + BOUND_SLACK_MM:
        chk.problems.append(f"{reader}: worst corner {worst:.4g} mm beyond the stated {chk.stated_error_mm:.4g} mm")


def check_run(out_dir, readers=("ome-zarr-py", "napari-ome-zarr")) -> list[StoreCheck]:
    """:func:`check_store` for every store of a ``helm-dask run`` output folder (an AssertionError if none)."""
    stores = volume_stores(out_dir)
    assert stores, f"no helm-dask stores under {out_dir}/*/helm.zarr"
    return [check_store(s, readers) for s in stores]


def failures(results: list[StoreCheck]) -> list[str]:
    """One line per broken promise."""
    return [f"{r.store.name}: {p}" for r in results for p in r.problems]


def report(results: list[StoreCheck]) -> str:
    """A table: store, kind, placement, stated bound and each reader's centre / worst-corner error (mm)."""
    lines = []
    for r in results:
        errs = "  ".join(f"{k} {c:.3g}/{w:.3g}" for k, (c, w) in r.errors_mm.items())
        lines.append(f"{r.store.name:<16} {r.kind:<7} {r.placement:<12} bound {r.stated_error_mm:8.3f} mm  {errs}")
    return "\n".join(lines)


def napari_drops_translation(tmp_dir) -> bool:
    """Whether the installed napari-ome-zarr ignores OME 0.5 translations (0.9.0-0.10.0 read only the first
    transform of dataset 0, the scale; 0.8.2 reads both). Probed on a tiny store with a known translation."""
    import dask.array as da

    from helm_dask.io.store import save_volume
    from helm_dask.volume import make_volume

    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [10.0, 20.0, 30.0]
    p = save_volume(make_volume(da.zeros((4, 4, 4), dtype="u1"), a), Path(tmp_dir) / "probe.zarr", overwrite=True)
    return bool(np.allclose(napari_view(p)["matrix"][:3, 3], 0.0))
