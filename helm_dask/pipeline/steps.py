"""What each stage of :data:`helm_dask.registry.STAGES` computes, as three small functions per stage: the
parameters that enter its key, the computation (which writes the stage's stores and records), and what the run
learns from the outputs (decisions recorded in ``run.json``, lazy views the next stages read)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .. import background as background_mod
from .. import kmeans as kmeans_mod
from .. import orient as orient_mod
from ..bias import bias_field, correct_bias, estimate_bias
from ..closing import close_labels, closing_additions, merge_labels, overlay_labels
from ..errors import HelmError
from ..io import location
from ..io.convert import nifti_to_zarr
from ..io.regions import store_view_of
from ..io.store import STORE_BATCH_CHUNKS, read_meta, set_label_colours
from ..labels import (
    FORNIX,
    HYPOTHALAMUS_LEFT,
    MANUAL_CODES,
    RIGHT_CODES,
    ExtraLabel,
    extra_right_to_left,
    load_label_table,
    lut_tables,
    parse_extra_labels,
    parse_label_map,
    validate_manual_labels,
)
from ..mirror import MirrorTransform, check_hypothalamus_plane, fit_mirror, mirror_labels, reflection_lut
from ..resample import (
    content_extent_mm,
    grid_reach_mm,
    ras_target_grid,
    resample,
    resample_labels,
    resample_labels_to_grid,
    resample_to_grid,
    target_grid,
)
from ..volume import affine_of, spacing_of
from .inputs import decide_side, external_mask, labels_on_scan_grid, update_meta
from .params import RunParams
from .subject import Subject, fingerprint_input


@dataclass
class Run:
    """One run's state shared by the steps: the options, the subject folder, the input checksums, and the volumes
    made so far (stored ones by store name, lazy derived ones under their own names)."""

    p: RunParams
    subj: Subject
    vols: dict[str, Any] = field(default_factory=dict)
    sha: dict[str, str | None] = field(default_factory=dict)
    params: dict[str, dict] = field(default_factory=dict)  # each stage's key parameters, once computed
    side: str = ""

    def params_of(self, stage: str) -> dict:
        return self.params[stage]

    @property
    def ks(self) -> list[int]:
        return [int(k) for k in self.p.ks]

    def record_path(self, filename: str) -> str:
        return self.subj.layout.file(filename)

    @property
    def extras(self) -> tuple[ExtraLabel, ...]:
        """``--extra-labels`` as pairs (empty without the option)."""
        return parse_extra_labels(self.p.extra_labels)


@dataclass(frozen=True)
class Step:
    """A stage's code: ``params(run)`` -> the key's parameters, ``compute(run, key)`` -> the stored outputs by
    name, ``after(run)`` -> whatever the run learns from them (called whether the stage ran or was up to date)."""

    params: Callable[[Run], dict]
    compute: Callable[[Run, str], dict]
    after: Callable[[Run], None] = lambda run: None


# ---- import -----------------------------------------------------------------------------------------------------


def fingerprint_inputs(run: Run) -> None:
    """Checksums of the scan, the labels and ``--mask``, reused from the store while size and mtime match.

    Parameters
    ----------
    run : Run
        Its ``sha`` and the subject's ``info["inputs"]`` are filled in.
    """
    p, subj, so = run.p, run.subj, run.p.storage_options
    cache = {}
    for nm in ("scan_raw", "labels_raw", "mask_raw"):
        stored = "preprocessed" if nm == "scan_raw" and p.preprocessed else nm  # --preprocessed: imported there
        try:
            cache[nm] = read_meta(subj.vpath(stored), storage_options=so).get("input_stamp")
        except HelmError:
            cache[nm] = None
    verify = p.verify_inputs
    run.sha["scan"] = fingerprint_input(p.scan, cache["scan_raw"], so, verify=verify)
    run.sha["labels"] = fingerprint_input(p.hypothalamus, cache["labels_raw"], so, verify=verify)
    subj.info["inputs"] = {
        location.absolute(p.scan): run.sha["scan"],
        location.absolute(p.hypothalamus): run.sha["labels"],
    }
    # how an unchanged input was recognised (a checksum is reused only when this says size + mtime)
    subj.info["input_check"] = "sha256" if verify else "size+mtime (sha256 when they change)"
    run.sha["mask"] = None
    if p.mask:
        # the cached checksum is the last mask's: only valid for the same file (masks are swapped more than scans)
        same = (cache["mask_raw"] or {}).get("path") == location.absolute(p.mask)
        run.sha["mask"] = fingerprint_input(p.mask, cache["mask_raw"] if same else None, so, verify=verify)
        subj.info["inputs"][location.absolute(p.mask)] = run.sha["mask"]


def _import_params(run: Run) -> dict:
    p = run.p
    return {
        "scan_sha256": run.sha["scan"],
        "labels_sha256": run.sha["labels"],
        "echo": p.echo,
        "echo_combine": p.echo_combine,
        "nonfinite": p.nonfinite,
        "chunks": p.chunks,
    }


def _import(run: Run, key: str) -> dict:
    p, subj, so = run.p, run.subj, run.p.storage_options
    subj.ensure_store()
    for nm, src, kind in (("scan_raw", p.scan, "image"), ("labels_raw", p.hypothalamus, "labels")):
        if subj.volume_ok(nm, key):
            continue
        nifti_to_zarr(
            src,
            subj.vpath(nm),
            chunks=p.chunks,
            echo=p.echo,
            echo_combine=p.echo_combine if p.echo is None else None,
            kind=kind,
            nonfinite=p.nonfinite,
            overwrite=True,
            quiet=subj.quiet,
            storage_options=so,
            ras=True,  # stored in RAS+ voxel order (exact): viewers then have only a real tilt left to miss
        )
        stamp = location.stamp(src, so)
        sha = read_meta(subj.vpath(nm), storage_options=so)["input_sha256"]
        update_meta(
            subj.vpath(nm), {"stage_key": key, "stage": "import", "input_stamp": {"stamp": stamp, "sha256": sha}}, so
        )
        set_label_colours(subj.vpath(nm), subj.label_colours(), storage_options=so)  # labels_raw's colours
    return {nm: subj.open(nm) for nm in ("scan_raw", "labels_raw")}


def _after_import(run: Run) -> None:
    if run.vols["scan_raw"].ndim != 3:
        raise HelmError("the scan is 4-D after import", path=run.p.scan, hint="pass --echo N or --echo-combine")
    # the labels' grid and codes: cheap, lazy, and before any long stage
    labels = labels_on_scan_grid(run.vols["labels_raw"], run.vols["scan_raw"], run.p)
    extras = run.extras
    # --extra-labels: their right codes become left ones, as 806-810 do (a hemisphere holds one side)
    mapping = {**extra_right_to_left(extras), **parse_label_map(run.p.label_map)} if extras else run.p.label_map
    run.vols["labels_checked"] = validate_manual_labels(
        labels,
        path=run.p.hypothalamus,
        mapping=mapping or None,
        allowed=MANUAL_CODES | {c for e in extras for c in (e.left, e.right)} if extras else None,
    )
    # the bag removal works on the RAS+ scan, before the left-right flip (the flip does not change the mask)
    run.vols["scan_ras"] = orient_mod.to_ras(run.vols["scan_raw"])


# ---- background -------------------------------------------------------------------------------------------------


def _background_params(run: Run) -> dict:
    p = run.p
    if p.mask:
        # a mask of the user's replaces the method: its checksum is the parameter (a new file recomputes)
        if p.fluid != "auto":
            run.subj.log(f"background: --fluid {p.fluid} is not used, the mask is {p.mask}")
        return {"method": "external", "mask_sha256": run.sha["mask"]}
    return {"method": "contrast-adaptive-hull+band-refine", "fluid": p.fluid}


def _background(run: Run, key: str) -> dict:
    p, subj = run.p, run.subj
    sha_mask = run.sha["mask"]
    batch = None
    if p.mask and sha_mask is not None:  # fingerprint_inputs sets it whenever --mask is given
        mask = external_mask(subj, key, run.vols["scan_raw"], run.vols["scan_ras"], sha_mask)
    else:
        # written in the refine's own boxes, its tasks grouped in them: they read the stored scan
        batch = background_mod.MASK_BATCH_CHUNKS
        mask = background_mod.brain_mask(run.vols["scan_ras"], fluid=p.fluid, batch_chunks=batch)
    params = run.params_of("background")
    return {"mask_ras": subj.save("mask_ras", mask, key, "background", params, batch_chunks=batch)}


def _after_background(run: Run) -> None:
    p, subj = run.p, run.subj
    mask_ras = run.vols["mask_ras"]
    # What the method decided (fluid side, thresholds; or which external mask): the mask's attrs["background"],
    # kept in its store's metadata, so a resumed run that skips the stage reports it too.
    subj.info["background"] = dict(mask_ras.attrs.get("background") or {})
    if p.mask:
        subj.info["background"]["path"] = location.absolute(p.mask)  # this run's name for the same file
    run.vols["labels_ras"] = orient_mod.to_ras(run.vols["labels_checked"])
    run.side, side_info = decide_side(subj, p.side, mask_ras, run.vols["labels_ras"])
    subj.info["side"] = {"given": p.side, "used": run.side, **side_info}


# ---- resample ---------------------------------------------------------------------------------------------------


def _resample_params(run: Run) -> dict:
    p = run.p
    return {
        "spacing": p.spacing,
        "grid": p.grid,
        "side": run.side,
        "label_map": p.label_map,
        "resample_labels": p.resample_labels,
    } | _extras_param(run)


def _extras_param(run: Run) -> dict:
    """``--extra-labels`` in a stage's key, only when given (the keys of runs without them stay as they were)."""
    return {"extra_labels": [e.to_dict() for e in run.extras]} if run.extras else {}


def working_grid(
    vol: Any, spacing: Any, grid: str, content: tuple = ()
) -> tuple[tuple[int, int, int], np.ndarray, bool]:
    """The working grid of a (left, RAS+) scan: ``(shape, affine, on_scan_grid)``.

    ``grid="scan"``: the scan's grid at ``spacing`` (:func:`helm_dask.resample.target_grid`; the scan itself
    for ``"native"``). ``grid="ras"``: the axis-aligned RAS+ grid over the scan's rotated field of view
    (:func:`helm_dask.resample.ras_target_grid`), which *is* the scan's grid when the scan is not tilted;
    ``on_scan_grid`` says whether the result is the scan's grid (block means and the scan-grid votes apply).
    A tilted scan's RAS grid is cut to the box of ``content`` (the brain mask and the labels, one pass over
    each) widened by the resampling's reach (:func:`helm_dask.resample.grid_reach_mm`), so that nothing nonzero
    falls outside it: the rotated field of view holds 1.62x the scan's voxels, the cut grid 0.85x (the 0.1 mm
    phantom), and every stage after resample pays per voxel.

    Parameters
    ----------
    vol : volume
        The scan in the working orientation.
    spacing : float or "native"
        ``--spacing``.
    grid : {"ras", "scan"}
        ``--grid``.

    Returns
    -------
    tuple
    """
    a = affine_of(vol)
    native = isinstance(spacing, str) and spacing == "native"
    scan_shape, scan_affine = (tuple(vol.shape[:3]), a) if native else target_grid(vol.shape, a, spacing)
    if grid == "scan":
        return scan_shape, scan_affine, True
    shape, affine = ras_target_grid(vol.shape, a, spacing)
    if tuple(shape) == tuple(scan_shape) and np.array_equal(affine, scan_affine):
        return scan_shape, scan_affine, True
    box = content_extent_mm(*content) if content else None
    if box is not None:
        reach = grid_reach_mm(a, affine)
        shape, affine = ras_target_grid(vol.shape, a, spacing, extent_mm=(box[0] - reach, box[1] + reach))
    return shape, affine, False


def _oriented(run: Run) -> tuple[Any, Any, Any, Any, Any]:
    """The scan, mask and labels in the working orientation (right hemispheres flipped to left), lazily."""
    scan_ras, mask_ras, labels_ras = run.vols["scan_ras"], run.vols["mask_ras"], run.vols["labels_ras"]
    if run.side == "R":
        scan_l, mask_l, labels_fl = (orient_mod.flip_left_right(v) for v in (scan_ras, mask_ras, labels_ras))
    else:
        scan_l, mask_l, labels_fl = scan_ras, mask_ras, labels_ras
    # labels_fl: flipped like the scan, right codes not yet mapped (a downsampling votes on it first)
    labels_l = orient_mod.map_right_to_left_codes(labels_fl)
    masked = background_mod.apply_mask(scan_l, mask_l)
    return scan_l, mask_l, labels_fl, labels_l, masked


def _resample(run: Run, key: str) -> dict:
    p, subj = run.p, run.subj
    scan_l, mask_l, labels_fl, labels_l, masked = _oriented(run)
    batch = None
    shape_ws, affine_ws, on_scan_grid = working_grid(scan_l, p.spacing, p.grid, (mask_l, labels_fl))
    img: Any
    if not on_scan_grid:
        # --grid ras, tilted scan: anti-aliased interpolation of the image, a 3-D vote for mask and labels,
        # one task per output chunk reading its rotated box from the stores
        img = resample_to_grid(scan_l, shape_ws, affine_ws, order=1, antialias=True, mask=mask_l)
        msk = resample_labels_to_grid(mask_l, shape_ws, affine_ws, method="majority")
        lab = resample_labels_to_grid(labels_fl, shape_ws, affine_ws, method="majority")
        lab = orient_mod.map_right_to_left_codes(lab)
    elif p.spacing == "native":
        img, msk, lab = masked, mask_l, labels_l
    else:
        # masked box by box inside each task: the stored scan and mask (and their reorientations) are read
        # straight from their stores, nothing is held between tasks; the label codes are mapped after the
        # vote (a hemisphere holds one side's codes, so the vote is the same)
        img = resample(scan_l, p.spacing, order=1, mask=mask_l)
        msk = resample_labels(mask_l, p.spacing, method="majority")
        lab = orient_mod.map_right_to_left_codes(resample_labels(labels_fl, p.spacing, method="majority"))
    if img is not masked and any(store_view_of(v.data) is None for v in (scan_l, mask_l, labels_fl)):
        # computed inputs (e.g. combined echoes) go through their chunks: an output chunk of a
        # downsampled grid needs ~ratio input chunks, so batches of fewer output chunks keep what a batch
        # holds at about STORE_BATCH_CHUNKS input chunks (measured at 0.1 -> 0.3 mm with full-size
        # batches, which cover nearly the whole input: 2.2 GB per worker)
        ratio = float(np.prod(spacing_of(affine_of(img)) / spacing_of(affine_of(masked))))
        batch = max(1, round(STORE_BATCH_CHUNKS / ratio)) if ratio > 1.0 else None
    params = run.params_of("resample")
    return {
        "image_ws": subj.save("image_ws", img, key, "resample", params, batch),
        "mask": subj.save("mask", msk, key, "resample", params, batch),
        "hypothalamus": subj.save("hypothalamus", lab, key, "resample", params, batch),
    }


# ---- bias -------------------------------------------------------------------------------------------------------

#: The saved field keeps 13 mantissa bits (relative error <= 6e-5): ~10x smaller stores and bias.nii.gz, ~7 GB
#: less per copy at 0.1 mm; the correction divides by the exact field.
_BIAS_FIELD_BITS = 13


def _bias_params(run: Run) -> dict:
    return {"method": "dct-mixture", "saved_field_bits": _BIAS_FIELD_BITS}


def _bias(run: Run, key: str) -> dict:
    subj, image_ws, mask_ws = run.subj, run.vols["image_ws"], run.vols["mask"]
    model = estimate_bias(image_ws, mask_ws)
    subj.write_json(run.record_path("bias_model.json"), {"model": model.to_dict()}, key)
    field_v = bias_field(model, image_ws, keep_bits=_BIAS_FIELD_BITS)
    corrected = correct_bias(image_ws, model, mask=mask_ws)
    # two computations, each evaluating the field inside its write tasks: in one computation the shared field
    # chunk (8 MB float32) has two dependents, so it is fused into neither write and may travel between workers,
    # to save ~0.1 s of CPU per chunk -- no gain measured in process, and the 0.1 mm bias stage ran at 137 s per
    # G voxels with it against 106 s before (on an interpolated, 1.6x larger working grid: not a clean comparison)
    params = run.params_of("bias")
    return {
        "bias": subj.save("bias", field_v, key, "bias", params),
        "preprocessed": subj.save("preprocessed", corrected, key, "bias", params),
    }


# ---- k-means: one histogram pass fits all k, one labelling pass writes all maps ---------------------------------


def _kmeans_params(run: Run) -> dict:
    return {"ks": run.ks, "method": run.p.kmeans_method, "seed": run.p.seed}


def _kmeans(run: Run, key: str) -> dict:
    p, subj = run.p, run.subj
    pre, mask_ws, km_json = run.vols["preprocessed"], run.vols["mask"], run.record_path("kmeans.json")
    if subj.json_ok(km_json, key):  # resume: the fit is done, only maps are missing
        results = {int(k): kmeans_mod.KMeansResult.from_dict(d) for k, d in subj.read_json(km_json)["results"].items()}
    else:
        results = kmeans_mod.fit_kmeans(pre, mask_ws, ks=run.ks, method=p.kmeans_method, seed=p.seed)
        subj.write_json(km_json, {"results": {str(k): r.to_dict() for k, r in results.items()}}, key)
    maps = {f"kmeans_k{k}": m for k, m in kmeans_mod.kmeans_maps(pre, mask_ws, results).items()}
    return subj.save_many(maps, key, "kmeans", run.params_of("kmeans"))


def _after_kmeans(run: Run) -> None:
    subj = run.subj
    subj.info["kmeans"] = subj.read_json(run.record_path("kmeans.json"))["results"]
    n_mask = next(iter(subj.info["kmeans"].values())).get("n_voxels")
    if n_mask is not None:
        subj.info["mask_mm3"] = float(n_mask) * float(np.prod(spacing_of(affine_of(run.vols["mask"]))))


# ---- merge: the closing does not depend on k -- once per subject, then one cheap override per k ------------------


def _merge_params(run: Run) -> dict:
    return {"closing_radius_mm": run.p.closing_radius_mm, "label_table": run.p.label_table} | _extras_param(run)


def _closed_labels(run: Run) -> Any:
    """The closed manual labels: every code closed together, or, with ``--extra-labels``, the hypothalamus codes
    only, the user's structures laid over as drawn (a closing would bridge them with their neighbours)."""
    hyp, extras = run.vols["hypothalamus"], run.extras
    if not extras:
        return close_labels(hyp, run.p.closing_radius_mm)
    lefts = {e.left for e in extras}
    closed = close_labels(hyp, run.p.closing_radius_mm, codes=sorted((set(HYPOTHALAMUS_LEFT) | {FORNIX}) - lefts))
    return overlay_labels(closed, hyp, sorted(lefts))


def _numbered(run: Run, k: int, vol: Any) -> Any:
    """A map of k in the label table's numbering when that depends on k (``--label-table helm``)."""
    table = load_label_table(run.p.label_table)
    return table.for_k(k).relabel(vol) if table.k_dependent else vol


def _merge(run: Run, key: str) -> dict:
    subj, params = run.subj, run.params_of("merge")
    if subj.volume_ok("closed_labels", key):
        closed = subj.open("closed_labels")
    else:
        closed = subj.save("closed_labels", _closed_labels(run), key, "merge", params)
    maps = {f"hemi_k{k}": _numbered(run, k, merge_labels(run.vols[f"kmeans_k{k}"], closed)) for k in run.ks}
    out = subj.save_many(maps, key, "merge", params)
    out["closed_labels"] = closed
    return out


def _after_merge(run: Run) -> None:
    write_lut(run.subj, run.p.label_table, run.ks, run.extras)
    run.subj.info["closing"] = _closing_record(run)


def _closing_record(run: Run) -> dict:
    """How many voxels the closing added per label and per k-means cluster (``run.json``, QC), counted once and
    kept in the ``closed_labels`` store's metadata (a rerun reads it)."""
    subj, so = run.subj, run.p.storage_options
    meta = read_meta(subj.vpath("closed_labels"), storage_options=so)
    rec = meta.get("closing_added")
    if rec is None:
        kms = {k: run.vols[f"kmeans_k{k}"] for k in run.ks}
        rec = closing_additions(run.vols["hypothalamus"], run.vols["closed_labels"], kms)
        update_meta(subj.vpath("closed_labels"), {"closing_added": rec}, so)
    return {"radius_mm": run.p.closing_radius_mm, "added_voxels": rec}


def write_lut(subj: Subject, table: Any, ks: list[int], extras: Any = ()) -> None:
    """``lut.txt`` in the subject folder, written atomically, and only when its text changes (a rerun that
    recomputes nothing writes nothing). A table that depends on k (``--label-table helm``) gets one
    ``lut_k{k}.txt`` per k, and ``lut.txt`` says so.

    Parameters
    ----------
    subj : Subject
        The subject.
    table : str or LabelTable
        ``--label-table``.
    ks : list of int
        The numbers of clusters (one colour ramp entry per cluster code).
    extras : sequence of ExtraLabel
        ``--extra-labels`` (entries for both sides).
    """
    tables = lut_tables(table, ks, extras)
    files = {subj.layout.lut: tables[ks[-1]].colorlut_text()} if ks else {}
    if load_label_table(table).k_dependent:
        files = {subj.layout.file(f"lut_k{k}.txt"): t.colorlut_text() for k, t in tables.items()}
        files[subj.layout.lut] = (
            f"# helm-dask: the numbering of this run (label table {load_label_table(table).name}) depends on k:\n"
            "# open label_map_kK and hemi_kK with lut_kK.txt next to them\n"
            "#No. Label Name:                            R   G   B   A\n"
            f"{0:<5d} {'Unknown':<40s}   0   0   0   0\n"
        )
    for target, text in files.items():
        try:
            if location.read_text(target, subj.so) == text:
                continue
        except (OSError, HelmError):
            pass  # missing or unreadable: write it
        location.write_text_atomic(target, text, subj.so)


# ---- mirror: fit once on the mask, resample every map with the same geometry ------------------------------------


def _mirror_params(run: Run) -> dict:
    params = {"alpha": run.p.alpha, "margin_mm": run.p.margin_mm, "seed": run.p.seed}
    if run.p.alpha == "auto":  # only then: a fixed alpha keeps its key (and its resumed outputs)
        params["max_gap_mm"] = run.p.max_gap_mm
    return params | _extras_param(run)


def _mirror(run: Run, key: str) -> dict:
    p, subj, tr_json = run.p, run.subj, run.record_path("transform.json")
    doc = subj.read_json(tr_json) if subj.json_ok(tr_json, key) else None
    if doc is None:
        transform = fit_mirror(run.vols["mask"], alpha=p.alpha, seed=p.seed, max_gap_mm=p.max_gap_mm)
        doc = {"transform": transform.to_dict()}
        subj.write_json(tr_json, doc, key)  # kept even if the check below stops the run
    transform = MirrorTransform.from_dict(doc["transform"])
    # the hypothalamus is a midline structure: labels far from the fitted plane mean mismatched inputs
    # (labels of another scan, a header that does not match the anatomy, a wrong mask) -- stop here
    check = check_hypothalamus_plane(transform, run.vols["hypothalamus"], path=p.hypothalamus)
    if doc.get("mirror_check") != check:
        # beside the transform, so that a rerun that skips this stage still reports it in run.json
        subj.write_json(tr_json, {**doc, "mirror_check": check}, key)
    maps, luts = _mirrored(run, transform)
    # the x > 0 half of each map is read back from its x < 0 half (reversed, renamed) instead of gathered again:
    # the gather reads ~2x2x2 source chunks of every map per output chunk, the read-back two stored chunks
    reflect = {f"label_map_k{k}": luts[k] for k in run.ks}
    return subj.save_many(
        {f"label_map_k{k}": maps[k] for k in run.ks}, key, "mirror", run.params_of("mirror"), reflect=reflect
    )


def _mirrored(run: Run, transform: MirrorTransform) -> tuple[dict, dict]:
    """Every k's whole-brain map (lazy) and its reflection table: the mirrored side renamed by
    :data:`RIGHT_CODES` and ``--extra-labels``; with a k-dependent table (helm), by that k's right codes, one
    gather per k (codes differ between ks)."""
    hemis = {k: run.vols[f"hemi_k{k}"] for k in run.ks}
    extras = {e.left: e.right for e in run.extras}
    table = load_label_table(run.p.label_table)
    if not table.k_dependent:
        rc = {**RIGHT_CODES, **extras} if extras else None  # None: the default mirror, as before
        maps = cast(dict, mirror_labels(hemis, transform, margin_mm=run.p.margin_mm, right_codes=rc))
        return maps, dict.fromkeys(hemis, reflection_lut(rc))
    out, luts = {}, {}
    for k, hemi in hemis.items():
        rc = {**extras, **table.for_k(k).right_codes()}
        out[k] = mirror_labels(hemi, transform, margin_mm=run.p.margin_mm, right_codes=rc)
        luts[k] = reflection_lut(rc)
    return out, luts


def _after_mirror(run: Run) -> None:
    tr_doc = run.subj.read_json(run.record_path("transform.json"))
    run.subj.info["transform"] = tr_doc["transform"]
    run.subj.info["mirror_check"] = tr_doc.get("mirror_check")


#: The code of every stage of :data:`helm_dask.registry.STAGES`, by name.
STEPS: dict[str, Step] = {
    "import": Step(_import_params, _import, _after_import),
    "background": Step(_background_params, _background, _after_background),
    "resample": Step(_resample_params, _resample),
    "bias": Step(_bias_params, _bias),
    "kmeans": Step(_kmeans_params, _kmeans, _after_kmeans),
    "merge": Step(_merge_params, _merge, _after_merge),
    "mirror": Step(_mirror_params, _mirror, _after_mirror),
}
