"""Benchmark the pipeline stage by stage on the phantom and append one row per stage (and one for the run).

    python bench/pipeline.py --input-spacing 0.5 --spacing 0.3 [--workers 2] [--until mirror] [--workdir DIR]
                             [--resume] [--no-nifti] [--anatomy geometric|mni152]

The phantom's scan and hypothalamus labels are written once as NIfTI in WORKDIR (unmeasured; the geometric scan is
the same file the I/O benchmark uses; ``--anatomy mni152`` is the template phantom, real anatomy with its noise
and texture, bright fluid, seed 0, in ``WORKDIR/mni152_<spacing>mm/``), then ``helm-dask run`` is timed on a fresh
output folder. Template rows are named ``pipeline-mni152:<stage>``. Per stage: wall time,
voxels per second (input voxels), peak RSS summed over client, scheduler and workers, bytes read and written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import Sampler, WorkerTime, append_row

from helm_dask.cluster import ClusterOptions, compute_context


def ensure_inputs(workdir: Path, spacing: float, anatomy: str = "geometric") -> tuple[Path, Path, int]:
    from helm_dask.io.convert import save_nifti
    from helm_dask.phantom import phantom

    tag = f"{spacing:g}mm"
    if anatomy == "geometric":
        scan, hyp = workdir / f"scan_{tag}.nii.gz", workdir / f"hypothalamus_{tag}.nii.gz"
    else:  # only the two files a run reads (the truth volumes would double the writing)
        (workdir / f"{anatomy}_{tag}").mkdir(exist_ok=True)
        scan, hyp = workdir / f"{anatomy}_{tag}" / "scan.nii.gz", workdir / f"{anatomy}_{tag}" / "hypothalamus.nii.gz"
    vols = phantom(spacing, side="L", seed=0, chunks=(256, 256, 16), anatomy=anatomy)
    if not scan.exists():
        save_nifti(vols["scan"], scan, dtype="float32")
    if not hyp.exists():
        save_nifti(vols["hypothalamus"], hyp)
    return scan, hyp, int(vols["scan"].size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-spacing", type=float, required=True)
    ap.add_argument("--spacing", default="0.3", help="working spacing in mm, or native")
    ap.add_argument("--until", default="mirror")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument("--workdir", default=os.environ.get("HELM_BENCH_DIR", "/tmp/helm-bench"))
    ap.add_argument("--note", default="")
    ap.add_argument("--no-nifti", action="store_true", help="Zarr store only (helm-dask run --no-nifti)")
    ap.add_argument("--anatomy", default="geometric", choices=["geometric", "mni152"], help="the phantom's anatomy")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the output folder: finished stages are reused (no row), the others measured",
    )
    args = ap.parse_args(argv)
    from helm_dask.pipeline import RunParams, run_subject

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    opts = ClusterOptions(
        workers=args.workers, threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit, quiet=True
    )
    spacing = "native" if args.spacing == "native" else float(args.spacing)
    geometric = args.anatomy == "geometric"
    out = work / f"run_{args.input_spacing:g}_{args.spacing}{'' if geometric else '_' + args.anatomy}"
    prefix = "pipeline" if geometric else f"pipeline-{args.anatomy}"
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    with compute_context(opts) as client:
        t_in = time.perf_counter()
        scan, hyp, nvox = ensure_inputs(work, args.input_spacing, args.anatomy)
        print(f"inputs ready in {time.perf_counter() - t_in:.0f} s (unmeasured)", flush=True)
        params = RunParams(
            scan=str(scan),
            hypothalamus=str(hyp),
            out=str(out),
            side="L",
            spacing=spacing,
            until=args.until,
            subject="bench",
            nifti=not args.no_nifti,
        )
        common = {
            "spacing_mm": args.input_spacing,
            "work_spacing_mm": args.spacing,
            "voxels": nvox,
            "workers": args.workers,
            "threads_per_worker": args.threads_per_worker,
            "note": args.note,
        }
        with Sampler() as s:
            t_stage = [time.perf_counter()]
            wt = WorkerTime(client)

            def log(msg: str) -> None:
                print(f"  {msg}", flush=True)
                if ": computing" in msg or ": writing" in msg:  # a stage or a NIfTI export starts
                    s.mark()
                    wt.mark()
                    t_stage[0] = time.perf_counter()
                elif ": done in" in msg or ": written in" in msg:
                    stage = msg.split(":", 1)[0]
                    peak, rd, wr = s.mark()
                    dt = time.perf_counter() - t_stage[0]
                    row = {
                        "stage": f"{prefix}:{stage}",
                        "wall_s": round(dt, 2),
                        "peak_rss_mb": round(peak / 2**20),
                        "read_mb": round(rd / 2**20),
                        "written_mb": round(wr / 2**20),
                        "load_avg": round(s.stage_load, 1),
                    }
                    row.update(common)
                    row["note"] = "; ".join(x for x in (common["note"], s.stage_breakdown, wt.mark()) if x)
                    row["mvox_per_s"] = round(nvox / dt / 1e6, 2) if dt > 0 else ""
                    append_row(row)  # at once: a long run that dies later keeps the stages it finished
                    print(", ".join(f"{k}={row[k]}" for k in ("stage", "wall_s", "peak_rss_mb")), flush=True)

            t0 = time.perf_counter()
            run_subject(params, log=log)
            total = time.perf_counter() - t0
        whole = dict(
            common,
            stage=f"{prefix}:total(until {args.until})",
            wall_s=round(total, 2),
            peak_rss_mb=round(s.peak_rss_overall / 2**20),
            mvox_per_s=round(nvox / total / 1e6, 2),
            read_mb=round(s.read_bytes / 2**20),
            written_mb=round(s.written_bytes / 2**20),
            load_avg=round(s.mean_load, 1),
        )
        append_row(whole)
        print(f"total {total:.1f}s, peak {whole['peak_rss_mb']} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
