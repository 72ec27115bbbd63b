"""Batch runs: a manifest (YAML or CSV) of subjects run one after the other on one cluster.

YAML::

    params:              # shared parameters (any ``helm-dask run`` option, with underscores)
      spacing: 0.3
      k: 4-9
    subjects:
      - scan: sub01_scan.nii.gz          # paths relative to the manifest's folder
        hypothalamus: sub01_hypo.nii.gz
        side: R
        subject: sub01                    # optional; default: the scan's name
        mask: sub01_samseg.mgz            # optional: the subject's own brain mask (--mask)
        alpha: 1.0e-3                     # optional per-subject overrides

CSV: a header with ``scan,hypothalamus,side`` and optionally ``subject``, ``mask`` and any parameter column.

``scan``/``hypothalamus``/``mask`` may be URLs (``s3://bucket/sub01_scan.nii.gz``); ``--out`` too.
``--storage-options`` applies to every subject (a ``storage_options`` mapping in the manifest overrides it).

The YAML is read with ``yaml.safe_load`` (no object construction from the file). A subject that fails is
reported and the others still run; every subject resumes stage by stage like a single run.
"""

from __future__ import annotations

import csv
import os
import time
import traceback
from dataclasses import fields, replace
from pathlib import Path

from .errors import HelmError
from .io.location import is_url
from .pipeline import RunParams, run_subject

_FIELDS = {f.name for f in fields(RunParams)}


def parse_ks(text) -> tuple[int, ...]:
    """``"4-9"`` -> (4, 5, 6, 7, 8, 9); ``"4,6,9"`` -> (4, 6, 9); validates 2 <= k <= 20."""
    if isinstance(text, (list, tuple)):
        ks = [int(k) for k in text]
    else:
        text = str(text).strip()
        ks = []
        try:
            for part in text.split(","):
                if "-" in part:
                    a, b = part.split("-", 1)
                    ks.extend(range(int(a), int(b) + 1))
                elif part:
                    ks.append(int(part))
        except ValueError:
            raise HelmError(f"--k {text!r} is not a list or range of integers", hint="e.g. --k 4-9 or --k 4,6,8") \
                from None
    bad = [k for k in ks if not 2 <= k <= 20]
    if not ks or bad:
        raise HelmError(f"k must be between 2 and 20 (got {bad or 'nothing'})", hint="e.g. --k 4-9")
    return tuple(sorted(set(ks)))


def _coerce(name: str, value):
    if value is None or value == "":
        return None
    if name == "ks" or name == "k":
        return parse_ks(value)
    if name == "spacing":
        return "native" if str(value) == "native" else float(value)
    if name in ("closing_radius_mm", "alpha", "margin_mm"):
        return float(value)
    if name in ("echo", "seed"):
        return int(value)
    if name == "resample_labels":
        return str(value).lower() in ("1", "true", "yes")
    if name == "storage_options":  # a mapping in YAML, a JSON object in a CSV cell
        from .io.location import parse_storage_options

        return parse_storage_options(value)
    return value


def load_manifest(path) -> tuple[dict, list[dict]]:
    """Shared parameters and the list of subjects of a YAML or CSV manifest (paths made absolute)."""
    p = Path(path)
    if not p.exists():
        raise HelmError("manifest not found", path=p, hint="check the path")
    base = p.parent
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise HelmError(f"is not valid YAML ({e})", path=p, hint="fix the manifest") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("subjects"), list):
            raise HelmError("has no 'subjects:' list", path=p, hint="see 'helm-dask run --help' for the format")
        shared = dict(doc.get("params") or {})
        subjects = [dict(s) for s in doc["subjects"]]
    elif p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            subjects = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
        shared = {}
    else:
        raise HelmError("a manifest must end in .yaml, .yml or .csv", path=p)
    for i, s in enumerate(subjects):
        for key in ("scan", "hypothalamus"):
            if not s.get(key):
                raise HelmError(f"subject {i + 1} has no '{key}'", path=p, hint="every subject needs scan and "
                                                                                "hypothalamus")
            if not os.path.isabs(s[key]) and not is_url(s[key]):
                s[key] = str(base / s[key])
        mask = s.get("mask")
        if mask and isinstance(mask, str) and not os.path.isabs(mask) and not is_url(mask):
            s["mask"] = str(base / mask)
    return shared, subjects


def subject_params(base: RunParams, shared: dict, entry: dict) -> RunParams:
    values = {}
    for src in (shared, entry):
        for k, v in src.items():
            name = {"k": "ks", "name": "subject"}.get(k, k).replace("-", "_")
            if name not in _FIELDS:
                raise HelmError(f"unknown manifest field {k!r}",
                                hint=f"known fields: {', '.join(sorted(_FIELDS - {'out'}))}")
            cv = _coerce(name, v)
            if cv is not None:
                values[name] = cv
    return replace(base, **values)


def run_batch(manifest, base: RunParams, *, quiet: bool = False) -> list[dict]:
    """Run every subject of a manifest; returns one summary row per subject (failures included)."""
    shared, subjects = load_manifest(manifest)
    rows = []
    for entry in subjects:
        t0 = time.perf_counter()
        try:
            params = subject_params(base, shared, entry)
            name = params.subject_name()
        except HelmError as e:
            rows.append({"subject": entry.get("subject") or Path(entry["scan"]).name, "status": f"failed: {e}",
                         "seconds": 0.0, "stages": {}})
            continue
        try:
            info = run_subject(params, quiet=quiet)
            rows.append(_summary_row(info, time.perf_counter() - t0))
        except HelmError as e:
            rows.append({"subject": name, "status": f"failed: {e}", "seconds": round(time.perf_counter() - t0, 1),
                         "stages": {}})
            if not quiet:
                print(f"[{name}] FAILED: {e}", flush=True)
        except Exception as e:  # keep going: one broken subject must not stop the batch
            rows.append({"subject": name, "status": f"failed: internal error {type(e).__name__}: {e}",
                         "seconds": round(time.perf_counter() - t0, 1), "stages": {}})
            if not quiet:
                traceback.print_exc()
    return rows


def _summary_row(info: dict, seconds: float) -> dict:
    row = {"subject": info["subject"], "status": "ok", "seconds": round(seconds, 1),
           "stages": {k: v["seconds"] for k, v in info.get("stages", {}).items()},
           "skipped": [k for k, v in info.get("stages", {}).items() if v["status"] == "skipped"]}
    tr = info.get("transform")
    if tr:
        row["overlap_fraction"] = tr.get("fraction_across")
        row["gap_mm"] = tr.get("gap_mm")
    km = info.get("kmeans")
    if km:
        first = next(iter(km.values()))
        row["mask_voxels"] = first.get("n_voxels")
    row["mask_mm3"] = info.get("mask_mm3")
    return row


def format_summary(rows: list[dict]) -> str:
    stages = []
    for r in rows:
        for s in r.get("stages", {}):
            if s not in stages:
                stages.append(s)
    head = ["subject", *[f"{s} s" for s in stages], "mask mm3", "overlap", "status"]
    lines = []
    for r in rows:
        ov = r.get("overlap_fraction")
        vol = r.get("mask_mm3")
        lines.append([r["subject"], *[f"{r['stages'][s]:.1f}" if s in r.get("stages", {}) else "-" for s in stages],
                      f"{vol:,.0f}" if isinstance(vol, (int, float)) else "-",
                      f"{ov:.2e}" if isinstance(ov, (int, float)) else "-", r["status"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])
