"""The whole pipeline on the template phantom, per fluid: does every stage finish, and how well do the six
k-means maps agree with the phantom's true tissue classes?

    python bench/template_pipeline.py [--fluids bright,dark,none] [--spacing 0.5] [--work-spacing 0.3]
                                      [--bag-gap-mm 5] [--seed 1] [--workers 2] [--keep] [--markdown FILE]

For each fluid: the 0.5 mm template phantom (``helm-dask phantom --anatomy mni152``, left hemisphere, bag gap
5 mm, seed 1) is written to a temporary folder (``$HELM_BENCH_DIR`` or the system's temporary directory, never
the repository; removed at the end unless ``--keep``), then ``helm-dask run SCAN --hypothalamus HYP --side auto
--spacing 0.3 --reference-tissue truth_tissue.nii.gz`` runs in-process (``--fluid auto``, the default: the run
decides the fluid itself). Recorded per stage: status (computed / failed), wall time, peak RSS of all processes;
then the QC page's k-means agreement (``run.json["kmeans_agreement"]``: adjusted Rand index inside the brain and
best-match Dice per tissue class, per k; see :func:`helm_dask.metrics.kmeans_agreement`).

Rows appended to ``results/results.csv`` (``harness.append_row``): ``template-run:<fluid>:<stage>`` per stage
(``...:between-stages`` for the NIfTI exports and the side decision between stages, ``...:qc``
for the QC page with the agreement pass, ``...:total``), ``template-phantom:<fluid>`` for writing
the phantom, and ``template-agree:<fluid>:k<k>`` with the ARI and Dice in the note. A run that fails (e.g. in
the background stage) gets a ``...:<stage>`` row with status FAILED and the error text verbatim in the note; the
other fluids still run. The summary tables are printed as Markdown (and written to ``--markdown FILE``).
No threshold: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import Sampler, append_row

from helm_dask.cluster import ClusterOptions, compute_context

CLASS_ORDER = (1, 2, 3, 5)
CLASS_SHORT = {1: "CSF/fluid", 2: "GM", 3: "WM", 4: "deep GM", 5: "hypothalamus"}


def _context(fluid: str, args) -> tuple[dict, str]:
    """The columns every row of this fluid shares, and the note's prefix."""
    base = {
        "spacing_mm": args.spacing,
        "work_spacing_mm": args.work_spacing,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
    }
    tag = (
        f"issue 17 item 6; template phantom, fluid {fluid}, bag gap {args.bag_gap_mm:g} mm, seed {args.seed}, "
        f"side L; run --side auto --fluid auto" + (f"; {args.note}" if args.note else "")
    )
    return base, tag


def write_template_phantom(fluid: str, args, ph: Path, base: dict, tag: str) -> dict:
    """Write the template phantom for one fluid (its own row); returns its output paths. Sets ``base["voxels"]``."""
    from helm_dask.phantom_io import write_phantom

    with Sampler() as s:
        t0 = time.perf_counter()
        outputs = write_phantom(
            ph,
            anatomy="mni152",
            spacing_mm=args.spacing,
            side="L",
            seed=args.seed,
            fluid=fluid,
            bag_gap_mm=args.bag_gap_mm,
            overwrite=True,
            quiet=True,
        )
        dt = time.perf_counter() - t0
    from helm_dask.io import read_nifti_header

    nvox = int(__import__("numpy").prod(read_nifti_header(outputs["scan"]).shape[:3]))
    base["voxels"] = nvox
    append_row(
        dict(
            base,
            stage=f"template-phantom:{fluid}",
            wall_s=round(dt, 2),
            mvox_per_s=round(nvox / dt / 1e6, 2),
            peak_rss_mb=round(s.peak_rss_overall / 2**20),
            read_mb=round(s.read_bytes / 2**20),
            written_mb=round(s.written_bytes / 2**20),
            load_avg=round(s.mean_load, 1),
            note=f"{tag}; 5 NIfTI files written",
        )
    )
    print(f"[{fluid}] phantom written in {dt:.1f}s ({nvox:,} voxels)", flush=True)
    return outputs


class StageLog:
    """The run's ``log`` callback: turns its messages into one row per stage (and the gaps between stages).

    Phases: a stage ("<stage>: computing" .. "done in"), or "between" (NIfTI exports, side decision), or the QC.
    """

    def __init__(self, s: Sampler, fluid: str, base: dict, tag: str, res: dict):
        self.s, self.fluid, self.base, self.tag, self.res = s, fluid, base, tag, res
        self.nvox = base["voxels"]
        self.cur: dict = {"phase": None, "stage": None, "t": time.perf_counter()}
        self.between = {"s": 0.0, "peak": 0, "rd": 0, "wr": 0}

    def row(
        self, stage: str, status: str, dt: float, peak: int, rd: int, wr: int, load: float, extra: str = ""
    ) -> None:
        r = dict(
            self.base,
            stage=f"template-run:{self.fluid}:{stage}",
            wall_s=round(dt, 2),
            mvox_per_s=round(self.nvox / dt / 1e6, 2) if dt > 0 else "",
            peak_rss_mb=round(peak / 2**20),
            read_mb=round(rd / 2**20),
            written_mb=round(wr / 2**20),
            load_avg=round(load, 1),
            note="; ".join(x for x in (self.tag, f"status {status}", extra) if x),
        )
        append_row(r)  # at once: a run that dies later keeps what it finished
        self.res["stages"].append({"stage": stage, "status": status, "seconds": round(dt, 2)})
        print(f"[{self.fluid}] {stage}: {status} in {dt:.1f}s, peak {r['peak_rss_mb']} MB", flush=True)

    def close_between(self, now: float) -> None:
        peak, rd, wr = self.s.mark()
        self.between["s"] += now - self.cur["t"]
        self.between["peak"] = max(self.between["peak"], peak)
        self.between["rd"] += rd
        self.between["wr"] += wr

    def __call__(self, msg: str) -> None:
        s, cur = self.s, self.cur
        print(f"  [{self.fluid}] {msg}", flush=True)
        now = time.perf_counter()
        if ": computing" in msg:
            if cur["phase"] == "between":
                self.close_between(now)
            else:
                s.mark()
            cur.update(phase="stage", stage=msg.split(":", 1)[0], t=now)
        elif ": done in" in msg:
            peak, rd, wr = s.mark()
            self.row(cur["stage"], "computed", now - cur["t"], peak, rd, wr, s.stage_load, s.stage_breakdown)
            cur.update(phase="between", stage="between stages", t=now)
        elif ": written in" in msg and cur["phase"] == "between":
            self.close_between(now)
            cur["t"] = now
        elif msg.startswith("QC report:"):
            peak, rd, wr = s.mark()
            self.row(
                "qc",
                "computed",
                now - cur["t"],
                peak,
                rd,
                wr,
                s.stage_load,
                "QC page incl. the k-means agreement pass (reference import, resample, 6 tables)",
            )
            cur.update(phase="done", stage=None, t=now)

    def failed(self, e: Exception) -> None:
        """The row of the stage the run died in, with the error verbatim."""
        cur = self.cur
        where = cur["stage"] or ("qc" if cur["phase"] == "between" else "start")
        self.res["error"] = {
            "stage": where,
            "type": type(e).__name__,
            "message": str(e),
            "traceback": traceback.format_exc(),
        }
        print(self.res["error"]["traceback"], file=sys.stderr, flush=True)
        peak, rd, wr = self.s.mark()
        self.row(
            where,
            "FAILED",
            time.perf_counter() - cur["t"],
            peak,
            rd,
            wr,
            self.s.stage_load,
            f"error verbatim: {type(e).__name__}: {e}",
        )

    def close(self) -> None:
        """The row that sums the gaps between stages."""
        b = self.between
        if b["s"] > 0:
            self.row(
                "between-stages",
                "computed",
                b["s"],
                b["peak"],
                b["rd"],
                b["wr"],
                self.s.mean_load,
                "sum of the gaps between stages: the NIfTI exports and the side decision",
            )


def run_pipeline(fluid: str, args, outputs: dict, out: Path, base: dict, tag: str, res: dict) -> None:
    """``run_subject`` on the phantom with a row per stage and one for the whole run; sets ``res["total_s"]``."""
    from helm_dask.pipeline import RunParams, run_subject

    params = RunParams(
        scan=outputs["scan"],
        hypothalamus=outputs["hypothalamus"],
        out=str(out),
        side="auto",
        spacing=args.work_spacing,
        subject="template",
        reference_tissue=outputs["truth_tissue"],
    )
    nvox = base["voxels"]
    with Sampler() as s:
        log = StageLog(s, fluid, base, tag, res)
        t0 = time.perf_counter()
        try:
            run_subject(params, log=log)
            status = "ok"
        except Exception as e:
            status = "FAILED"
            log.failed(e)
        log.close()
        total = time.perf_counter() - t0
        append_row(
            dict(
                base,
                stage=f"template-run:{fluid}:total",
                wall_s=round(total, 2),
                mvox_per_s=round(nvox / total / 1e6, 2),
                peak_rss_mb=round(s.peak_rss_overall / 2**20),
                read_mb=round(s.read_bytes / 2**20),
                written_mb=round(s.written_bytes / 2**20),
                load_avg=round(s.mean_load, 1),
                note=f"{tag}; status {status}; whole run incl. exports and QC",
            )
        )
    res["total_s"] = round(total, 2)


def read_run_json(out: Path, res: dict) -> None:
    """The run's own stage times, the fluid it decided and the k-means agreement, from its run.json."""
    run_json = out / "template" / "run.json"
    if run_json.exists():
        info = json.loads(run_json.read_text())
        res["run_stages"] = {
            k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in (info.get("stages") or {}).items()
        }
        bg = info.get("background") or {}
        res["background"] = {"fluid_side": bg.get("fluid_side"), "mask_mm3": info.get("mask_mm3")}
        res["agreement"] = info.get("kmeans_agreement")


def agreement_rows(fluid: str, base: dict, tag: str, res: dict) -> None:
    """One ``template-agree:<fluid>:k<k>`` row per k (ARI and Dice per class in the note)."""
    ag = res["agreement"]
    if ag and not ag.get("error"):
        for k, r in sorted(ag["ks"].items(), key=lambda kv: int(kv[0])):
            dice = {int(c): d for c, d in r["dice"].items()}
            parts = [f"ARI {r['ari']:.4f}"] + [
                f"Dice {CLASS_SHORT.get(c, c)} {dice[c]['dice']:.3f} (cluster {dice[c]['cluster']})"
                for c in CLASS_ORDER
                if c in dice
            ]
            exc = r.get("excluded") or {}
            append_row(
                dict(
                    base,
                    stage=f"template-agree:{fluid}:k{k}",
                    wall_s="",
                    note=f"{tag}; " + "; ".join(parts) + f"; {r['voxels']:,} voxels where both are non-zero (left out: "
                    f"{exc.get('kmeans_only', 0):,} k-means only, {exc.get('tissue_only', 0):,} truth "
                    "only)",
                )
            )
    elif ag:
        res["error"] = res["error"] or {"stage": "qc", "type": "agreement", "message": ag["error"]}


def run_fluid(fluid: str, args, work: Path) -> dict:
    """Phantom + pipeline for one fluid; returns ``{"stages": [...], "agreement": ..., "error": ...}``."""
    res: dict = {"fluid": fluid, "stages": [], "agreement": None, "error": None, "background": None}
    ph = work / f"phantom_{fluid}"
    out = work / f"run_{fluid}"
    shutil.rmtree(out, ignore_errors=True)
    base, tag = _context(fluid, args)
    outputs = write_template_phantom(fluid, args, ph, base, tag)
    run_pipeline(fluid, args, outputs, out, base, tag, res)
    read_run_json(out, res)
    agreement_rows(fluid, base, tag, res)
    if not args.keep:
        shutil.rmtree(ph, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return res


def markdown(results: list[dict]) -> str:
    stages = ["import", "background", "resample", "bias", "kmeans", "merge", "mirror"]
    lines = [
        "| fluid | fluid decided | " + " | ".join(stages) + " | between stages (exports, side) | QC + agreement "
        "| total s |",
        "|---|---|" + "---|" * (len(stages) + 3),
    ]
    for r in results:
        rs = r.get("run_stages") or {}
        by = {st["stage"]: ("FAILED" if st["status"] == "FAILED" else st["seconds"]) for st in r["stages"]}
        cells = []
        for st in stages + ["between-stages", "qc"]:
            v = by.get(st)
            if v == "FAILED":
                cells.append("**FAILED**")
            elif st in rs:
                cells.append(f"{float(rs[st]['seconds']):.1f}")
            elif v is not None:
                cells.append(f"{float(v):.1f}")
            else:
                cells.append("not run")
        decided = (r.get("background") or {}).get("fluid_side") or "\u2013"
        total = f"{r['total_s']:.1f}" if "total_s" in r else "\u2013"
        lines.append(f"| {r['fluid']} | {decided} | " + " | ".join(cells) + f" | {total} |")
    lines += [
        "",
        "| fluid | k | ARI | Dice CSF/fluid (1) | Dice GM (2) | Dice WM (3) | Dice hypothalamus (5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ag = r.get("agreement")
        if not ag or ag.get("error"):
            why = (ag or {}).get("error") or (r.get("error") or {}).get("message", "no result")
            lines.append(f"| {r['fluid']} | \u2013 | not available: {why} | | | | |")
            continue
        for k, a in sorted(ag["ks"].items(), key=lambda kv: int(kv[0])):
            dice = {int(c): d for c, d in a["dice"].items()}
            cells = [f"{dice[c]['dice']:.3f} (c{dice[c]['cluster']})" if c in dice else "\u2013" for c in CLASS_ORDER]
            lines.append(f"| {r['fluid']} | {k} | {a['ari']:.3f} | " + " | ".join(cells) + " |")
    errs = [r for r in results if r.get("error")]
    for r in errs:
        e = r["error"]
        lines += ["", f"{r['fluid']}: failed in stage `{e.get('stage')}`: `{e.get('type')}: {e.get('message')}`"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fluids", default="bright,dark,none")
    ap.add_argument("--spacing", type=float, default=0.5, help="phantom voxel size in mm (default 0.5)")
    ap.add_argument("--work-spacing", type=float, default=0.3, help="run --spacing (default 0.3)")
    ap.add_argument("--bag-gap-mm", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument(
        "--workdir",
        default=os.environ.get("HELM_BENCH_DIR") or None,
        help="parent of the temporary folder (default $HELM_BENCH_DIR or the system temp dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the phantoms and runs (their folder is printed)")
    ap.add_argument("--markdown", help="also write the summary tables to this file")
    ap.add_argument("--note", default="", help="appended to every row's note")
    ap.add_argument("--json", help="also write the full results (stages, agreement, errors) to this file")
    args = ap.parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="helm-template-", dir=args.workdir))
    print(f"working in {work}", flush=True)
    opts = ClusterOptions(
        workers=args.workers, threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit, quiet=True
    )
    results = []
    try:
        with compute_context(opts):
            for fluid in [f.strip() for f in args.fluids.split(",") if f.strip()]:
                results.append(run_fluid(fluid, args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    md = markdown(results)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
