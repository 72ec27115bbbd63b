"""The HELM pipeline for one subject: stages composed, written to the subject's store, resumable.

Layout of ``OUT/<subject>/``::

    helm.zarr/            one helm-dask volume per stage output (scan_raw, labels_raw, mask, preprocessed, ...)
    preprocessed.nii.gz   mask.nii.gz  bias.nii.gz  hypothalamus.nii.gz      (--until preprocess)
    kmeans_k{k}.nii.gz    hemi_k{k}.nii.gz  lut.txt                          (--until kmeans / merge)
    label_map_k{k}.nii.gz transform.json                                     (--until mirror, the default)
    run.json              parameters, stage keys, timings and decisions of the last run

Resumability. Every output -- a volume in ``helm.zarr``, a JSON file, a NIfTI export (in a header extension)
-- records the *key* of the stage that made it: a hash of the stage's parameters, the keys of the stages it
reads, the package version, the stage's algorithm version (:data:`STAGE_VERSIONS`) and the checksums of the input
files (an external ``--mask`` is one: it replaces the background stage's method). A stage runs only if one of its
outputs is missing, unfinished or carries another key; so a rerun with the same inputs and parameters recomputes
nothing, a changed parameter recomputes that stage and (through the keys) every stage after it, and a run killed
midway resumes at the first output that was not finished (each output is written under a temporary name and
renamed).

Object storage. ``scan``, ``hypothalamus`` and ``out`` may be fsspec URLs (``s3://bucket/out``), with
``storage_options`` (endpoint, credentials; see :mod:`helm_dask.io.location`): the subject folder, ``helm.zarr``
with every intermediate, the NIfTI exports, the JSON files and ``lut.txt`` then live under the URL. There is no
rename on object stores: NIfTI and JSON files are uploads committed only when complete, Zarr volumes carry their
``complete`` flag; resuming works the same. The QC page is written only for local (or shared-filesystem)
outputs: it is skipped, with a log line, for a URL. The storage options are never written to ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .background import FLUID_CHOICES
from .errors import HelmError
from .io import location
from .io.convert import nifti_to_zarr, save_nifti
from .io.mgh import is_mgh_path
from .io.nifti import file_sha256, is_nifti_path, read_nifti_provenance
from .io.regions import store_view_of
from .io.store import STORE_BATCH_CHUNKS, open_group, open_volume, read_meta, save_volume
from .labels import DEFAULT_KS
from .volume import affine_of, like, provenance_record, spacing_of

STAGES = ("import", "background", "resample", "bias", "kmeans", "merge", "mirror")
#: ``--until`` names -> the last stage they run.
UNTIL = {"preprocess": "bias", "kmeans": "kmeans", "merge": "merge", "mirror": "mirror"}
#: Version of each stage's algorithm, part of its key: bump a stage's number whenever a change of the code alters
#: that stage's output, so that a resumed run never reuses a store made by older code. Keys chain through the
#: keys of the stages they read, so a bump recomputes that stage and every stage after it.
STAGE_VERSIONS = {"import": 1, "background": 5, "resample": 1, "bias": 2, "kmeans": 1, "merge": 1, "mirror": 2}
#: ``--fluid``: what fills the bag around the specimen (see :func:`helm_dask.background.brain_mask`).
FLUIDS = FLUID_CHOICES


@dataclass
class RunParams:
    """Everything that defines a subject's run (the CLI flags of ``helm-dask run``)."""

    scan: str
    hypothalamus: str
    out: str
    side: str = "auto"
    mask: str | None = None  # an external brain mask on the scan's grid (NIfTI/MGH; non-zero = brain)
    fluid: str = "auto"  # what fills the bag: auto|bright|dark|none (unused with ``mask``)
    subject: str | None = None
    spacing: Any = 0.3  # mm, or "native"
    until: str = "mirror"
    echo: int | None = None
    echo_combine: str = "rms"
    nonfinite: str = "error"
    resample_labels: bool = False
    label_map: dict = field(default_factory=dict)  # extra code -> code mapping for the manual labels
    ks: tuple = DEFAULT_KS
    kmeans_method: str = "histogram"
    closing_radius_mm: float = 1.2
    alpha: float = 5e-4
    margin_mm: float = 10.0
    label_table: str = "freesurfer"
    layout: str = "flat"
    chunks: tuple | None = None
    seed: int = 0
    qc: bool = True  # write OUT/<subject>/qc/report.html at the end (local outputs only)
    nifti: bool = True  # write the .nii.gz exports (False: the Zarr store only; not a stage
    # parameter, so a later run with True exports what is missing)
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs (never written to run.json)
    reference_tissue: str | None = None  # a tissue-class map on the scan's grid: QC reports the k-means agreement
    # (not a stage parameter: no stage reads it)
    verify_inputs: bool = False  # recognise unchanged inputs by content (sha256), not size + mtime

    def subject_name(self) -> str:
        """The subject's folder under ``out``: ``subject`` if given (refused unless a safe single path
        component), else the scan's file name without extension made one (other characters -> ``_``). The
        default depends on the scan's name only, so a subject keeps its folder (and its resume) whatever else
        a manifest lists."""
        if self.subject:
            return location.check_component(self.subject, what="subject name")
        name = Path(self.scan).name
        for ext in (".nii.gz", ".nii", ".zarr"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        return location.safe_component(name)


def stage_key(stage: str, params: dict, upstream: dict[str, str]) -> str:
    """Hash of what makes a stage's output: its parameters, its algorithm version (:data:`STAGE_VERSIONS`), the
    package version and the keys of the stages it reads."""
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


class Subject:
    """One subject's output folder and store, with the bookkeeping that makes stages resumable."""

    def __init__(self, params: RunParams, *, quiet: bool = False, log: Callable[[str], None] | None = None):
        self.p = params
        self.name = params.subject_name()
        self.so = params.storage_options
        self.dir = location.join(params.out, self.name)
        self.store = location.join(self.dir, "helm.zarr")
        self.quiet = quiet
        self._log = log
        self.keys: dict[str, str] = {}
        self.info: dict[str, Any] = {"subject": self.name, "stages": {}}

    # -- logging ------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        elif not self.quiet:
            print(f"[{self.name}] {msg}", flush=True)

    # -- outputs ------------------------------------------------------------------------------------------------
    def path(self, filename: str) -> str:
        """A file in the subject folder (a path or a URL)."""
        return location.join(self.dir, filename)

    def vpath(self, name: str) -> str:
        return location.join(self.store, name)

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
        return bool(prov) and prov.get("stage_key") == key

    def save(self, name: str, vol, key: str, stage: str, params: dict, batch_chunks: int | None = None) -> Any:
        """Write a volume into the subject store (atomically) and return it reopened lazily from disk."""
        location.makedirs(self.store, self.so)
        vol = like(vol, vol.data, step=provenance_record(stage, params, self.input_checksums()))
        save_volume(
            vol,
            self.vpath(name),
            chunks=self.p.chunks,
            overwrite=True,
            extra={"stage_key": key, "stage": stage},
            storage_options=self.so,
            batch_chunks=batch_chunks,
        )
        return self.open(name)

    def save_many(self, vols: dict, key: str, stage: str, params: dict) -> dict:
        """Write several volumes from one shared Dask computation (inputs read once); skip those already done."""
        from .io.store import save_volumes

        location.makedirs(self.store, self.so)
        todo = {
            self.vpath(n): like(v, v.data, step=provenance_record(stage, params, self.input_checksums()))
            for n, v in vols.items()
            if not self.volume_ok(n, key)
        }
        if todo:
            save_volumes(
                todo,
                chunks=self.p.chunks,
                overwrite=True,
                extra={"stage_key": key, "stage": stage},
                storage_options=self.so,
            )
        return {n: self.open(n) for n in vols}

    def write_json(self, path: str, payload: dict, key: str) -> None:
        payload = dict(payload, stage_key=key, version=__version__)
        location.write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default), self.so)

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
        save_nifti(vol, path, dtype=dtype, overwrite=True, provenance=prov, quiet=True, storage_options=self.so)
        self.log(f"export {filename}: written in {time.perf_counter() - t0:.1f}s")
        return path

    # -- inputs -------------------------------------------------------------------------------------------------
    def input_checksums(self) -> dict[str, str]:
        return dict(self.info.get("inputs", {}))


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def fingerprint_input(
    path: str, cache: dict | None, storage_options: dict | None = None, *, verify: bool = False
) -> str:
    """SHA-256 of an input file; reuses a cached value when size and mtime (ETag on S3) are unchanged, unless
    ``verify`` (``--verify-inputs``: a file replaced by another of the same size and mtime is then noticed)."""
    stamp = location.stamp(path, storage_options)
    if not verify and cache and cache.get("stamp") == stamp and cache.get("sha256"):
        return cache["sha256"]
    return file_sha256(path, storage_options=storage_options)


# ----------------------------------------------------------------------------------------------------------------
# Stages. Each returns its outputs (lazy volumes reopened from the store) and records its key.


def _stage(
    subj: Subject,
    stage: str,
    params: dict,
    upstream: list[str],
    outputs: list[str],
    compute: Callable[[str], dict],
    *,
    json_outputs: list[str] = (),
) -> dict:
    """Run ``compute(key)`` unless every output already carries ``key``; returns the outputs."""
    key = stage_key(stage, params, {u: subj.keys[u] for u in upstream})
    subj.keys[stage] = key
    done = all(subj.volume_ok(o, key) for o in outputs) and all(subj.json_ok(j, key) for j in json_outputs)
    t0 = time.perf_counter()
    if done:
        subj.log(f"{stage}: up to date, nothing to do")
        result = {o: subj.open(o) for o in outputs}
        status = "skipped"
    else:
        subj.log(f"{stage}: computing")
        result = compute(key)
        status = "computed"
    dt = time.perf_counter() - t0
    subj.info["stages"][stage] = {"key": key, "status": status, "seconds": round(dt, 2), "params": params}
    if status == "computed":
        subj.log(f"{stage}: done in {dt:.1f}s")
    return result


def run_subject(params: RunParams, *, quiet: bool = False, log=None) -> dict:
    """Run (or resume) the pipeline for one subject up to ``params.until``. Returns a summary dict.

    One process at a time writes a subject (local outputs): a second run of the same subject waits for the
    first, then finds its outputs done (:func:`helm_dask.io.location.exclusive`).
    """
    name = params.subject_name()
    say = log or ((lambda m: None) if quiet else (lambda m: print(f"[{name}] {m}", flush=True)))
    folder = location.join(params.out, name)
    new = not location.is_url(folder) and not os.path.exists(folder)
    with location.exclusive(folder, what=f"subject {name!r}", log=say):
        try:
            return _run_subject(params, quiet=quiet, log=log)
        except BaseException:
            if new:  # a run that failed before writing anything leaves no empty folders behind
                _remove_empty_tree(Path(folder))
            raise


def _remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but (nested) empty folders."""
    try:
        if not folder.is_dir() or any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            return
        for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        folder.rmdir()
    except OSError:
        pass  # something appeared meanwhile: keep it


def _run_subject(params: RunParams, *, quiet: bool = False, log=None) -> dict:
    from . import orient as orient_mod

    if params.until not in UNTIL:
        raise HelmError(f"unknown --until {params.until!r}", hint=f"choose from {', '.join(UNTIL)}")
    last = STAGES.index(UNTIL[params.until])
    so = params.storage_options
    for f, what in ((params.scan, "scan"), (params.hypothalamus, "hypothalamus labels")):
        if not location.exists(f, so):
            raise HelmError(f"{what} not found", path=f, hint="check the path")
        if not is_nifti_path(f):
            raise HelmError(f"the {what} must be a .nii or .nii.gz file", path=f, hint="convert it to NIfTI")
    if params.mask:
        if not location.exists(params.mask, so):
            raise HelmError("brain mask not found", path=params.mask, hint="check the --mask path")
        if not (is_nifti_path(params.mask) or is_mgh_path(params.mask)):
            raise HelmError(
                "the brain mask must be a .nii, .nii.gz, .mgz or .mgh file",
                path=params.mask,
                hint="convert it to NIfTI (e.g. mri_convert mask.mgz mask.nii.gz)",
            )
    if params.side not in ("L", "R", "auto"):
        raise HelmError(f"--side must be L, R or auto, not {params.side!r}")
    if params.fluid not in FLUIDS:
        raise HelmError(f"--fluid must be one of {', '.join(FLUIDS)}, not {params.fluid!r}")
    if params.layout == "helm" and not params.nifti:
        raise HelmError(
            "--layout helm arranges the NIfTI files, and --no-nifti writes none",
            hint="drop one of the two (a later run without --no-nifti writes the files)",
        )
    from .io.nifti import read_nifti_header
    from .labels import lut_table

    lut_table(params.label_table, params.ks)  # a bad --label-table now, not after the k-means
    head = read_nifti_header(params.scan, storage_options=so)
    if head.stored_ndim < 3 or min(head.shape[:3]) < 2:
        # a single plane would be imported and fail much later with messages about other things
        what = f"a {head.stored_ndim}-D image" if head.stored_ndim < 3 else "a single slice"
        raise HelmError(
            f"the scan is {what} (shape {tuple(head.shape[: max(head.stored_ndim, 2)])}), not a 3-D volume",
            path=params.scan,
            hint="give the 3-D scan (or a 4-D multi-echo scan)",
        )
    subj = Subject(params, quiet=quiet, log=log)
    location.makedirs(subj.dir, so)
    t_start = time.perf_counter()

    # ---- import -------------------------------------------------------------------------------------------
    cache = {}
    for nm in ("scan_raw", "labels_raw", "mask_raw"):
        try:
            cache[nm] = read_meta(subj.vpath(nm), storage_options=so).get("input_stamp")
        except HelmError:
            cache[nm] = None
    verify = params.verify_inputs
    sha_scan = fingerprint_input(params.scan, cache["scan_raw"], so, verify=verify)
    sha_lab = fingerprint_input(params.hypothalamus, cache["labels_raw"], so, verify=verify)
    subj.info["inputs"] = {location.absolute(params.scan): sha_scan, location.absolute(params.hypothalamus): sha_lab}
    # how an unchanged input was recognised (a checksum is reused only when this says size + mtime)
    subj.info["input_check"] = "sha256" if verify else "size+mtime (sha256 when they change)"
    sha_mask = None
    if params.mask:
        # the cached checksum is the last mask's: only valid for the same file (masks are swapped more than scans)
        same = (cache["mask_raw"] or {}).get("path") == location.absolute(params.mask)
        sha_mask = fingerprint_input(params.mask, cache["mask_raw"] if same else None, so, verify=verify)
        subj.info["inputs"][location.absolute(params.mask)] = sha_mask
    imp_params = {
        "scan_sha256": sha_scan,
        "labels_sha256": sha_lab,
        "echo": params.echo,
        "echo_combine": params.echo_combine,
        "nonfinite": params.nonfinite,
        "chunks": params.chunks,
    }

    def do_import(key):
        location.makedirs(subj.store, so)
        for nm, src, kind in (("scan_raw", params.scan, "image"), ("labels_raw", params.hypothalamus, "labels")):
            if subj.volume_ok(nm, key):
                continue
            nifti_to_zarr(
                src,
                subj.vpath(nm),
                chunks=params.chunks,
                echo=params.echo,
                echo_combine=params.echo_combine if params.echo is None else None,
                kind=kind,
                nonfinite=params.nonfinite,
                overwrite=True,
                quiet=quiet,
                storage_options=so,
            )
            stamp = location.stamp(src, so)
            sha = read_meta(subj.vpath(nm), storage_options=so)["input_sha256"]
            _update_meta(
                subj.vpath(nm),
                {"stage_key": key, "stage": "import", "input_stamp": {"stamp": stamp, "sha256": sha}},
                so,
            )
        return {nm: subj.open(nm) for nm in ("scan_raw", "labels_raw")}

    out = _stage(subj, "import", imp_params, [], ["scan_raw", "labels_raw"], do_import)
    scan_raw, labels_raw = out["scan_raw"], out["labels_raw"]
    if scan_raw.ndim != 3:
        raise HelmError("the scan is 4-D after import", path=params.scan, hint="pass --echo N or --echo-combine")

    # ---- labels: grid check, codes (cheap, lazy) ----------------------------------------------------------------
    from .labels import validate_manual_labels

    labels_raw = _labels_on_scan_grid(labels_raw, scan_raw, params)
    labels_raw = validate_manual_labels(labels_raw, path=params.hypothalamus, mapping=params.label_map or None)

    # ---- background (on the RAS+ scan, before the left-right flip: the flip does not change the mask) -----------
    from .background import apply_mask, brain_mask

    scan_ras = orient_mod.to_ras(scan_raw)
    if params.mask:
        # a mask of the user's replaces the method: its checksum is the parameter (a new file recomputes)
        bg_params = {"method": "external", "mask_sha256": sha_mask}
        if params.fluid != "auto":
            subj.log(f"background: --fluid {params.fluid} is not used, the mask is {params.mask}")
    else:
        bg_params = {"method": "contrast-adaptive-hull+band-refine", "fluid": params.fluid}

    def do_background(key):
        if params.mask:
            mask = _external_mask(subj, key, scan_raw, scan_ras, sha_mask)
        else:
            mask = brain_mask(scan_ras, fluid=params.fluid)
        return {"mask_ras": subj.save("mask_ras", mask, key, "background", bg_params)}

    mask_ras = _stage(subj, "background", bg_params, ["import"], ["mask_ras"], do_background)["mask_ras"]
    # What the method decided (fluid side, thresholds; or which external mask): the mask's attrs["background"],
    # kept in its store's metadata, so a resumed run that skips the stage reports it too.
    subj.info["background"] = dict(mask_ras.attrs.get("background") or {})
    if params.mask:
        subj.info["background"]["path"] = location.absolute(params.mask)  # this run's name for the same file
    labels_ras = orient_mod.to_ras(labels_raw)
    side, side_info = _decide_side(subj, params.side, mask_ras, labels_ras)
    subj.info["side"] = {"given": params.side, "used": side, **side_info}
    if last < STAGES.index("resample"):
        return _finish(subj, t_start)

    # ---- orientation (lazy) + resampling ---------------------------------------------------------------------
    from .resample import resample, resample_labels

    if side == "R":
        scan_l, mask_l, labels_fl = (orient_mod.flip_left_right(v) for v in (scan_ras, mask_ras, labels_ras))
    else:
        scan_l, mask_l, labels_fl = scan_ras, mask_ras, labels_ras
    # labels_fl: flipped like the scan, right codes not yet mapped (a downsampling votes on it first)
    labels_l = orient_mod.map_right_to_left_codes(labels_fl)
    masked = apply_mask(scan_l, mask_l)
    rs_params = {
        "spacing": params.spacing,
        "side": side,
        "label_map": params.label_map,
        "resample_labels": params.resample_labels,
    }

    def do_resample(key):
        batch = None
        if params.spacing == "native":
            img, msk, lab = masked, mask_l, labels_l
        else:
            # masked box by box inside each task: the stored scan and mask (and their reorientations) are read
            # straight from their stores, nothing is held between tasks; the label codes are mapped after the
            # vote (a hemisphere holds one side's codes, so the vote is the same)
            img = resample(scan_l, params.spacing, order=1, mask=mask_l)
            msk = resample_labels(mask_l, params.spacing, method="majority")
            lab = orient_mod.map_right_to_left_codes(resample_labels(labels_fl, params.spacing, method="majority"))
            if any(store_view_of(v.data) is None for v in (scan_l, mask_l, labels_fl)):
                # computed inputs (e.g. combined echoes) go through their chunks: an output chunk of a
                # downsampled grid needs ~ratio input chunks, so batches of fewer output chunks keep what a batch
                # holds at about STORE_BATCH_CHUNKS input chunks (measured at 0.1 -> 0.3 mm with full-size
                # batches, which cover nearly the whole input: 2.2 GB per worker)
                ratio = float(np.prod(spacing_of(affine_of(img)) / spacing_of(affine_of(masked))))
                batch = max(1, round(STORE_BATCH_CHUNKS / ratio)) if ratio > 1.0 else None
        return {
            "image_ws": subj.save("image_ws", img, key, "resample", rs_params, batch),
            "mask": subj.save("mask", msk, key, "resample", rs_params, batch),
            "hypothalamus": subj.save("hypothalamus", lab, key, "resample", rs_params, batch),
        }

    out = _stage(subj, "resample", rs_params, ["background"], ["image_ws", "mask", "hypothalamus"], do_resample)
    image_ws, mask_ws, hyp_ws = out["image_ws"], out["mask"], out["hypothalamus"]

    # ---- bias ---------------------------------------------------------------------------------------------------
    from .bias import bias_field, correct_bias, estimate_bias

    bias_params = {"method": "dct-mixture", "saved_field_bits": 13}
    bias_json = subj.path("bias_model.json")

    def do_bias(key):
        model = estimate_bias(image_ws, mask_ws)
        subj.write_json(bias_json, {"model": model.to_dict()}, key)
        # the saved field keeps 13 mantissa bits (relative error <= 6e-5): ~10x smaller stores and bias.nii.gz,
        # ~7 GB less per copy at 0.1 mm; the correction below divides by the exact field
        field_v = bias_field(model, image_ws, keep_bits=13)
        corrected = correct_bias(image_ws, model, mask=mask_ws)
        return {
            "bias": subj.save("bias", field_v, key, "bias", bias_params),
            "preprocessed": subj.save("preprocessed", corrected, key, "bias", bias_params),
        }

    out = _stage(subj, "bias", bias_params, ["resample"], ["bias", "preprocessed"], do_bias, json_outputs=[bias_json])
    pre, bias_v = out["preprocessed"], out["bias"]
    for vol, fname, dtype in (
        (pre, "preprocessed.nii.gz", "float32"),
        (mask_ws, "mask.nii.gz", "uint8"),
        (bias_v, "bias.nii.gz", "float32"),
        (hyp_ws, "hypothalamus.nii.gz", "uint16"),
    ):
        subj.export(vol, fname, subj.keys["bias"], dtype=dtype)
    if last < STAGES.index("kmeans"):
        return _finish(subj, t_start)

    # ---- k-means: one histogram pass fits all k, one labelling pass writes all maps --------------------------
    from .kmeans import KMeansResult, fit_kmeans, kmeans_maps

    ks = [int(k) for k in params.ks]
    km_params = {"ks": ks, "method": params.kmeans_method, "seed": params.seed}
    km_json = subj.path("kmeans.json")
    km_names = [f"kmeans_k{k}" for k in ks]

    def do_kmeans(key):
        if subj.json_ok(km_json, key):  # resume: the fit is done, only maps are missing
            results = {int(k): KMeansResult.from_dict(d) for k, d in subj.read_json(km_json)["results"].items()}
        else:
            results = fit_kmeans(pre, mask_ws, ks=ks, method=params.kmeans_method, seed=params.seed)
            subj.write_json(km_json, {"results": {str(k): r.to_dict() for k, r in results.items()}}, key)
        maps = {f"kmeans_k{k}": m for k, m in kmeans_maps(pre, mask_ws, results).items()}
        return subj.save_many(maps, key, "kmeans", km_params)

    km = _stage(subj, "kmeans", km_params, ["bias"], km_names, do_kmeans, json_outputs=[km_json])
    subj.info["kmeans"] = subj.read_json(km_json)["results"]

    n_mask = next(iter(subj.info["kmeans"].values())).get("n_voxels")
    if n_mask is not None:
        subj.info["mask_mm3"] = float(n_mask) * float(np.prod(spacing_of(affine_of(mask_ws))))
    for k in ks:
        subj.export(km[f"kmeans_k{k}"], f"kmeans_k{k}.nii.gz", subj.keys["kmeans"], dtype="uint8")
    if last < STAGES.index("merge"):
        return _finish(subj, t_start)

    # ---- merge: the closing does not depend on k -- once per subject, then six cheap overrides -----------------
    from .closing import close_labels, merge_labels

    mg_params = {"closing_radius_mm": params.closing_radius_mm, "label_table": params.label_table}
    hemi_names = [f"hemi_k{k}" for k in ks]

    def do_merge(key):
        if subj.volume_ok("closed_labels", key):
            closed = subj.open("closed_labels")
        else:
            closed = subj.save("closed_labels", close_labels(hyp_ws, params.closing_radius_mm), key, "merge", mg_params)
        maps = {f"hemi_k{k}": merge_labels(km[f"kmeans_k{k}"], closed) for k in ks}
        out = subj.save_many(maps, key, "merge", mg_params)
        out["closed_labels"] = closed
        return out

    mg = _stage(subj, "merge", mg_params, ["kmeans", "resample"], hemi_names + ["closed_labels"], do_merge)
    for k in ks:
        subj.export(mg[f"hemi_k{k}"], f"hemi_k{k}.nii.gz", subj.keys["merge"], dtype="uint16")
    _write_lut(subj, params.label_table, ks)
    if last < STAGES.index("mirror"):
        return _finish(subj, t_start)

    # ---- mirror: fit once on the mask, resample all six maps with the same geometry --------------------------
    from .mirror import MirrorTransform, fit_mirror, mirror_labels

    mr_params = {"alpha": params.alpha, "margin_mm": params.margin_mm, "seed": params.seed}
    tr_json = subj.path("transform.json")
    lm_names = [f"label_map_k{k}" for k in ks]

    def do_mirror(key):
        from .mirror import check_hypothalamus_plane

        doc = subj.read_json(tr_json) if subj.json_ok(tr_json, key) else None
        if doc is None:
            transform = fit_mirror(mask_ws, alpha=params.alpha, seed=params.seed)
            doc = {"transform": transform.to_dict()}
            subj.write_json(tr_json, doc, key)  # kept even if the check below stops the run
        transform = MirrorTransform.from_dict(doc["transform"])
        # the hypothalamus is a midline structure: labels far from the fitted plane mean mismatched inputs
        # (labels of another scan, a header that does not match the anatomy, a wrong mask) -- stop here
        check = check_hypothalamus_plane(transform, hyp_ws, path=params.hypothalamus)
        if doc.get("mirror_check") != check:
            # beside the transform, so that a rerun that skips this stage still reports it in run.json
            subj.write_json(tr_json, {**doc, "mirror_check": check}, key)
        maps = mirror_labels({k: mg[f"hemi_k{k}"] for k in ks}, transform, margin_mm=params.margin_mm)
        return subj.save_many({f"label_map_k{k}": maps[k] for k in ks}, key, "mirror", mr_params)

    lm = _stage(subj, "mirror", mr_params, ["merge", "resample"], lm_names, do_mirror, json_outputs=[tr_json])
    tr_doc = subj.read_json(tr_json)
    subj.info["transform"] = tr_doc["transform"]
    subj.info["mirror_check"] = tr_doc.get("mirror_check")
    for k in ks:
        subj.export(lm[f"label_map_k{k}"], f"label_map_k{k}.nii.gz", subj.keys["mirror"], dtype="uint16")
    return _finish(subj, t_start)


def _write_lut(subj: Subject, table, ks) -> None:
    """``lut.txt`` in the subject folder, written atomically, and only when its text changes (a rerun that
    recomputes nothing writes nothing)."""
    from .labels import lut_table

    target = subj.path("lut.txt")
    text = lut_table(table, ks).colorlut_text()
    try:
        if location.read_text(target, subj.so) == text:
            return
    except (OSError, HelmError):
        pass  # missing or unreadable: write it
    location.write_text_atomic(target, text, subj.so)


def _update_meta(path: str, extra: dict, storage_options: dict | None = None) -> None:
    g = open_group(path, "r+", storage_options)
    meta = dict(g.attrs["helm_dask"])
    meta.update(extra)
    g.attrs["helm_dask"] = meta


def _external_mask(subj: Subject, key: str, scan_raw, scan_ras, sha: str):
    """The ``--mask`` file, checked and imported, as a lazy 0/1 uint8 mask on the RAS+ scan grid.

    Checks: 3-D and on the scan's grid (the header, before anything is streamed), finite values, not empty. The
    file is streamed into ``helm.zarr/mask_raw`` like the scan (bounded memory; kept, with the stage key, so a
    run killed during the stage does not import it again), then reoriented exactly like the scan (any non-zero
    value = brain).
    """
    import dask.array as da

    from .io.convert import read_header
    from .orient import check_same_grid, to_ras
    from .volume import make_volume, orientation_code

    src, so = subj.p.mask, subj.so
    fix = (
        "give a mask on the scan's voxel grid (e.g. SAMSEG's segmentation of this scan; any non-zero value is "
        "brain), or drop --mask to compute one"
    )
    if not subj.volume_ok("mask_raw", key):
        info = read_header(src, storage_options=so)
        if len(info.shape) != 3:
            raise HelmError(f"the brain mask is {len(info.shape)}-D (shape {info.shape}), not 3-D", path=src, hint=fix)
        header_only = make_volume(da.zeros(info.shape, dtype=np.uint8, chunks=info.shape), info.affine, kind="mask")
        try:
            check_same_grid(scan_raw, header_only, path=src)
        except HelmError as e:  # its message speaks of labels and its hint of --resample-labels
            raise HelmError(
                e.message.replace("the labels", "the brain mask"),
                path=src,
                hint="resample the mask onto the scan first (nearest neighbour, e.g. mri_vol2vol "
                "--regheader --interp nearest), or drop --mask to compute one",
            ) from None
        # NaN/inf are zeroed on import and counted: refused here with a message about the mask, not the scan
        out = nifti_to_zarr(
            src,
            subj.vpath("mask_raw"),
            chunks=subj.p.chunks,
            kind="labels",
            nonfinite="zero",
            pyramid=False,
            overwrite=True,
            quiet=subj.quiet,
            storage_options=so,
        )
        if out["nonfinite"]:
            location.remove_quietly(subj.vpath("mask_raw"), so)
            raise HelmError(f"the brain mask has {out['nonfinite']:,} NaN or infinite voxels", path=src, hint=fix)
        _update_meta(
            subj.vpath("mask_raw"),
            {
                "stage_key": key,
                "stage": "background",
                "input_stamp": {
                    "stamp": location.stamp(src, so),
                    "sha256": out["sha256"],
                    "path": location.absolute(src),
                },
            },
            so,
        )
    raw = subj.open("mask_raw")
    n = int(da.count_nonzero(raw.data).compute())
    if n == 0:
        raise HelmError("the brain mask is empty (every voxel is 0)", path=src, hint=fix)
    ras = to_ras(raw)
    # The grids agree within check_same_grid's tolerance (1e-4 mm); the mask takes the scan's exact affine so that
    # it sits on the scan like a computed mask would (apply_mask and the resampling compare affines exactly).
    mask = like(
        ras,
        (ras.data != 0).astype(np.uint8),
        affine=affine_of(scan_ras),
        kind="mask",
        name="brain_mask",
        step=provenance_record(
            "background", {"method": "external", "nonzero_is_brain": True}, {location.absolute(src): sha}
        ),
    )
    mask.attrs["background"] = {
        "method": "external",
        "path": location.absolute(src),
        "sha256": sha,
        "orientation_in": orientation_code(affine_of(raw)),
        "voxels": n,
        "mm3": n * float(np.prod(spacing_of(affine_of(raw)))),
    }
    return mask


def _labels_on_scan_grid(labels, scan, params: RunParams):
    from .orient import check_same_grid

    if params.resample_labels:
        try:
            check_same_grid(scan, labels, path=params.hypothalamus)
        except HelmError:
            from .resample import resample_to_grid

            return resample_to_grid(labels, scan.shape, affine_of(scan), order=0)
        return labels
    check_same_grid(scan, labels, path=params.hypothalamus)
    return labels


def _decide_side(subj: Subject, given: str, mask_ras, labels_ras) -> tuple[str, dict]:
    from .orient import check_side, detect_side, require_clear_side

    detected, info = detect_side(mask_ras, labels_ras)
    if given == "auto":
        # a weak decision would be a guess (orient.SIDE_MIN_STRENGTH): refuse it rather than mirror wrongly;
        # an explicit --side is trusted (a disagreement is only warned about, below)
        require_clear_side(info, path=subj.p.hypothalamus)
        subj.log(f"side: auto -> {detected} ({info.get('reason', '')})")
        return detected, info
    warn = check_side(given, info)
    if warn:
        subj.log(f"WARNING: {warn}")
        print(f"helm-dask: warning: {warn}", file=sys.stderr)
    return given, info


#: ``--layout helm``: the published dataset's folders, filled with links to the subject's outputs.
HELM_LAYOUT = {
    "preprocessed": ["preprocessed.nii.gz"],
    "hypothalamus": ["hypothalamus.nii.gz"],
    "whole_brain_segmentation": ["kmeans_k{k}.nii.gz"],
    "label_maps": ["label_map_k{k}.nii.gz"],
}


def arrange_helm_layout(out: str | Path, subject: str, ks, *, storage_options: dict | None = None) -> list:
    """Hard-link (or copy) a subject's exports into ``OUT/<folder>/<subject>[_k{k}].nii.gz`` like the dataset.

    On object storage (``out`` a URL) the files are copied server-side.
    """
    import shutil

    if location.is_url(out):
        made = []
        for folder, patterns in HELM_LAYOUT.items():
            for pat in patterns:
                for k in ks if "{k}" in pat else [None]:
                    src = location.join(out, subject, pat.format(k=k))
                    if not location.exists(src, storage_options):
                        continue
                    dst = location.join(out, folder, f"{subject}{'' if k is None else f'_k{k}'}.nii.gz")
                    location.copy_file(src, dst, storage_options)
                    made.append(dst)
        return made
    out = Path(out)
    made = []
    for folder, patterns in HELM_LAYOUT.items():
        for pat in patterns:
            for k in ks if "{k}" in pat else [None]:
                src = out / subject / pat.format(k=k)
                if not src.exists():
                    continue
                suffix = "" if k is None else f"_k{k}"
                dst = out / folder / f"{subject}{suffix}.nii.gz"
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(location.sibling(dst, ".tmp"))  # unique: concurrent runs do not share it
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copy2(src, tmp)
                os.replace(tmp, dst)
                made.append(dst)
    return made


def _finish(subj: Subject, t_start: float) -> dict:
    if subj.p.layout == "helm":
        arrange_helm_layout(subj.p.out, subj.name, subj.p.ks, storage_options=subj.so)
    subj.info["seconds"] = round(time.perf_counter() - t_start, 2)
    subj.info["status"] = "ok"
    # Storage options may hold credentials: they stay out of run.json (they do not change any result).
    subj.info["params"] = {k: v for k, v in asdict(subj.p).items() if k != "storage_options"}
    location.write_text_atomic(subj.path("run.json"), json.dumps(subj.info, indent=2, default=_json_default), subj.so)
    if subj.p.qc and location.is_url(subj.dir):
        # The QC page reads its inputs through local paths and writes a folder of images; on object storage
        # it is left out rather than half-supported. Run `helm-dask run` on a local or shared-filesystem OUT
        # (or copy the subject folder down) to get it.
        subj.log("QC report skipped: the output is on object storage (QC pages are written for local outputs)")
    elif subj.p.qc:
        from .qc import write_qc_report

        # QC reads bounded slices and the pyramid only: seconds, whatever the volume size.
        report = write_qc_report(subj.dir)
        subj.log(f"QC report: {report}")
    return subj.info
