"""The stage runner: one subject's stages, in the registry's order, each skipped when its outputs carry its key."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .. import orient as orient_mod
from ..cluster import trim_workers
from ..errors import HelmError
from ..io import location
from ..io.store import distributed_client
from ..layout import SubjectLayout
from ..progress import stage_progress
from ..registry import STAGES, Stage, expand, producer_of, stages_until
from .inputs import decide_side, given_mask, import_given
from .params import RunParams, check_params
from .steps import STEPS, Run, fingerprint_inputs
from .subject import Subject, json_default, stage_key


def run_subject(params: RunParams, *, quiet: bool = False, log=None) -> dict:
    """Run (or resume) the pipeline for one subject up to ``params.until``.

    One process at a time writes a subject (local outputs): a second run of the same subject waits for the
    first, then finds its outputs done (:func:`helm_dask.io.location.exclusive`).

    Parameters
    ----------
    params : RunParams
        The run's options (``helm-dask run``'s flags).
    quiet : bool
        No progress lines.
    log : callable, optional
        Receives the progress lines instead of stdout.

    Returns
    -------
    dict
        What ``run.json`` records: inputs and their checksums, each stage's key, status, time and parameters,
        and the decisions of the run (side, background, k-means, mirror plane).
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
    check_params(params)
    subj = Subject(params, quiet=quiet, log=log)
    location.makedirs(subj.dir, params.storage_options)
    t_start = time.perf_counter()
    run = Run(params, subj)
    fingerprint_inputs(run)
    stages = stages_until(params.until)
    if params.preprocessed:
        _given_preprocessed(run)
        stages = tuple(s for s in stages if s.name not in GIVEN_STAGES)
    for stage in stages:
        step = STEPS[stage.name]
        run.params[stage.name] = step.params(run)
        run.vols.update(run_stage(run, stage))
        subj.record_stores(stage.outputs(run.ks) + (["mask_raw"] if stage.name == "background" and params.mask else []))
        step.after(run)
        for ex in stage.exports:
            for store in expand([ex.store], run.ks):
                subj.export(run.vols[store], f"{store}.nii.gz", subj.keys[stage.name], dtype=ex.dtype)
        if stage.exports:
            trim_workers(distributed_client())
    return _finish(subj, t_start)


#: ``--preprocessed``: the stages whose outputs the user gives (the image is already masked, resampled and corrected).
GIVEN_STAGES = ("import", "background", "resample", "bias")


def _given_params(run: Run) -> dict:
    p = run.p
    return {
        "preprocessed": True,
        "scan_sha256": run.sha["scan"],
        "labels_sha256": run.sha["labels"],
        "mask": {"method": "external", "mask_sha256": run.sha["mask"]} if p.mask else "non-zero voxels",
        "echo": p.echo,
        "echo_combine": p.echo_combine,
        "nonfinite": p.nonfinite,
        "chunks": p.chunks,
        "side": p.side,
        "label_map": p.label_map,
        "resample_labels": p.resample_labels,
    }


def _given_preprocessed(run: Run) -> None:
    """``--preprocessed``: import the given image as ``preprocessed``, its mask (``--mask`` or the non-zero voxels)
    as ``mask`` and its labels (checked like the scan's) as ``hypothalamus``, under one key that stands for every
    stage of :data:`GIVEN_STAGES`; ``run.json`` records those stages as ``given``. Resumable like a stage."""
    subj, p = run.subj, run.p
    params = _given_params(run)
    key = stage_key("import", params, {})
    outputs = ["preprocessed", "mask", "hypothalamus"]
    done = all(subj.volume_ok(o, key) for o in outputs)
    subj.log("import (preprocessed): " + ("up to date, nothing to do" if done else "computing"))
    t0 = time.perf_counter()
    vols = import_given(subj, key)
    run.vols["scan_raw"], run.vols["labels_raw"] = vols["preprocessed"], vols["labels_raw"]
    STEPS["import"].after(run)  # 3-D, the labels' grid and codes: checked as for a scan
    if p.fluid != "auto" or p.grid != "ras":
        subj.log("import (preprocessed): --fluid and --grid are not used (the image is already masked, on its grid)")
    if done:
        mask, labels = subj.open("mask"), subj.open("hypothalamus")
    else:
        mask = given_mask(subj, key, vols["preprocessed"], run.sha["mask"])
        labels = orient_mod.map_right_to_left_codes(run.vols["labels_checked"])
    run.side, side_info = decide_side(subj, p.side, mask, labels)
    if run.side != "L":
        raise HelmError(
            "--preprocessed takes a left hemisphere (the working orientation), and this one is a right one",
            path=p.scan,
            hint="flip the image and its labels to a left hemisphere, or run the whole pipeline on the scan",
        )
    subj.info["side"] = {"given": p.side, "used": run.side, **side_info}
    if not done:
        mask = subj.save("mask", mask, key, "import", params)
        labels = subj.save("hypothalamus", labels, key, "import", params)
    run.vols.update(preprocessed=vols["preprocessed"], mask=mask, hypothalamus=labels)
    subj.record_stores(outputs + ["labels_raw"] + (["mask_raw"] if p.mask else []))
    _record_given(run, key, params, "skipped" if done else "computed", time.perf_counter() - t0)
    for ex in next(s for s in STAGES if s.name == "bias").exports:
        if ex.store in run.vols:  # every export of the given stages but the bias field (there is none)
            subj.export(run.vols[ex.store], f"{ex.store}.nii.gz", key, dtype=ex.dtype)


def _record_given(run: Run, key: str, params: dict, status: str, seconds: float) -> None:
    """``run.json`` of a ``--preprocessed`` run: what was given, and the given stages under the import's key."""
    subj, p = run.subj, run.p
    subj.info["background"] = dict(run.vols["mask"].attrs.get("background") or {})
    if p.mask:
        subj.info["background"]["path"] = location.absolute(p.mask)
    subj.info["preprocessed"] = {
        "image": location.absolute(p.scan),
        "labels": location.absolute(p.hypothalamus),
        "mask": location.absolute(p.mask) if p.mask else "non-zero voxels of the image",
        "given_stages": list(GIVEN_STAGES[1:]),
    }
    subj.info["stages"]["import"] = {"key": key, "status": status, "seconds": round(seconds, 2), "params": params}
    for name in GIVEN_STAGES:
        subj.keys[name] = key  # the stages after read 'preprocessed', 'mask' and 'hypothalamus' through these
        if name != "import":
            subj.info["stages"][name] = {"key": key, "status": "given", "seconds": 0.0, "params": {"given": True}}
        run.params[name] = params


def run_stage(run: Run, stage: Stage) -> dict:
    """Compute a stage unless every store and record it writes already carries its key; its outputs, lazily.

    The key chains through the keys of the stages whose stores it reads, so a changed parameter or algorithm
    version recomputes that stage and every stage after it.

    Parameters
    ----------
    run : Run
        The run so far (``run.params[stage.name]`` already set).
    stage : Stage
        The registry's declaration of the stage.

    Returns
    -------
    dict
        Store name -> volume, reopened lazily from the store.
    """
    subj, params = run.subj, run.params[stage.name]
    upstream = sorted({p.name for p in map(producer_of, stage.inputs(run.ks)) if p is not None})
    key = stage_key(stage.name, params, {u: subj.keys[u] for u in upstream})
    subj.keys[stage.name] = key
    outputs = stage.outputs(run.ks)
    records = [run.record_path(r) for r in stage.records]
    pending = [o for o in outputs if not subj.volume_ok(o, key)]
    done = not pending and all(subj.json_ok(j, key) for j in records)
    t0 = time.perf_counter()
    if done:
        subj.log(f"{stage.name}: up to date, nothing to do")
        result = {o: subj.open(o) for o in outputs}
        status = "skipped"
    else:
        subj.log(f"{stage.name}: computing")
        # one bar for the whole stage, in chunks: the stores it writes announce theirs (helm_dask.io.store)
        desc, guess = f"[{subj.name}] {stage.name}", _chunks_read(run, stage)
        with stage_progress(desc, outputs=len(pending), chunks_per_output=guess, quiet=subj.quiet):
            result = STEPS[stage.name].compute(run, key)
        trim_workers(distributed_client())  # the workers keep freed memory within a stage, not across stages
        status = "computed"
    dt = time.perf_counter() - t0
    subj.info["stages"][stage.name] = {"key": key, "status": status, "seconds": round(dt, 2), "params": params}
    if status == "computed":
        subj.log(f"{stage.name}: done in {dt:.1f}s")
    return result


def _chunks_read(run: Run, stage: Stage) -> int | None:
    """The chunks of the first stored volume ``stage`` reads: the progress's guess of each of its stores' chunks
    until the first one begins (a stage writes on the grid it reads, except the resampling)."""
    for name in stage.inputs(run.ks):
        blocks = getattr(getattr(run.vols.get(name), "data", None), "numblocks", None)
        if blocks:
            return int(math.prod(blocks))
    return None


def arrange_helm_layout(out: str | Path, subject: str, ks, *, storage_options: dict | None = None) -> list:
    """Hard-link (or copy) a subject's exports into ``OUT/<folder>/<subject>[_k{k}].nii.gz`` like the dataset.

    On object storage (``out`` a URL) the files are copied server-side.

    Parameters
    ----------
    out : str or Path
        The output root.
    subject : str
        The subject's folder name.
    ks : iterable of int
        The numbers of clusters of the run.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    list
        The links (or copies) made; exports that do not exist are left out.
    """
    made: list = []
    url = location.is_url(out)
    for src, dst in SubjectLayout(str(out), subject).helm_links(ks):
        if url:
            if location.exists(src, storage_options):
                location.copy_file(src, dst, storage_options)
                made.append(dst)
            continue
        if not Path(src).exists():
            continue
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(location.sibling(dst, ".tmp"))  # unique: concurrent runs do not share it
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
        made.append(Path(dst))
    return made


def _finish(subj: Subject, t_start: float) -> dict:
    if subj.p.layout == "helm":
        arrange_helm_layout(subj.p.out, subj.name, subj.p.ks, storage_options=subj.so)
    subj.info["seconds"] = round(time.perf_counter() - t_start, 2)
    subj.info["status"] = "ok"
    # Storage options may hold credentials: they stay out of run.json (they do not change any result).
    subj.info["params"] = {k: v for k, v in asdict(subj.p).items() if k != "storage_options"}
    location.write_text_atomic(
        subj.layout.record("run"), json.dumps(subj.info, indent=2, default=json_default), subj.so
    )
    if subj.p.qc and location.is_url(subj.dir):
        # The QC page reads its inputs through local paths and writes a folder of images; on object storage
        # it is left out rather than half-supported. Run `helm-dask run` on a local or shared-filesystem OUT
        # (or copy the subject folder down) to get it.
        subj.log("QC report skipped: the output is on object storage (QC pages are written for local outputs)")
    elif subj.p.qc:
        from ..qc import write_qc_report  # here, not at the top: matplotlib loads only when a page is written

        # QC reads bounded slices and the pyramid only: seconds, whatever the volume size.
        report = write_qc_report(subj.dir)
        subj.log(f"QC report: {report}")
    return subj.info
