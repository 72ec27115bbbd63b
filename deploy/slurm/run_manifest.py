#!/usr/bin/env python
"""Run a helm-dask manifest on a SLURM cluster with dask-jobqueue.

Starts a Dask scheduler here (login node, or a small batch job), submits worker jobs sized by
``jobqueue.yaml`` (one job = one worker, 2 threads, 4 GiB), prints the scheduler and dashboard addresses, then
runs ``helm-dask run MANIFEST --out OUT --scheduler <address>`` against it and cancels the worker jobs at the
end. Scans, manifest and OUT must be on a file system that the compute nodes see under the same paths.

    python deploy/slurm/run_manifest.py /shared/study/manifest.yaml --out /shared/study/out --jobs 8
    python deploy/slurm/run_manifest.py manifest.yaml --out out --dry-run     # print the job script only

Arguments after ``--`` go to ``helm-dask run`` unchanged (e.g. ``-- --spacing native --k 4-6``).
Needs dask-jobqueue (``pip install dask-jobqueue``) in the same environment as helm-dask.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import dask
import yaml
from distributed import Client

DEFAULT_CONFIG = Path(__file__).with_name("jobqueue.yaml")


def _import_jobqueue():
    try:
        import dask_jobqueue
    except ImportError:
        raise SystemExit(
            "dask-jobqueue is not installed: pip install dask-jobqueue (in helm-dask's environment)"
        ) from None
    return dask_jobqueue


def load_jobqueue_config(path=DEFAULT_CONFIG) -> dict:
    """The ``jobqueue:`` mapping of a dask-jobqueue YAML file (read with ``yaml.safe_load``, no env expansion:
    ``$TMPDIR`` and friends are left for the job's shell on the compute node)."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("jobqueue"), dict):
        raise SystemExit(f"{path}: expected a 'jobqueue:' mapping (dask-jobqueue configuration)")
    return doc


def jobqueue_config(doc: dict):
    """Context manager: dask's configuration with the file's ``jobqueue:`` merged over dask-jobqueue's defaults.

    Merged rather than set as-is because SLURMCluster reads every key of its section (python, shebang, ...) and
    the file only lists the ones it changes. Keep it open while the cluster lives: dask-jobqueue reads the
    configuration again whenever it writes a job script.
    """
    _import_jobqueue()  # registers dask-jobqueue's defaults, which the merge needs
    return dask.config.set({"jobqueue": dask.config.merge(dask.config.get("jobqueue", {}), doc["jobqueue"])})


def make_cluster(**overrides):
    """A ``dask_jobqueue.SLURMCluster`` from the current configuration (non-None keyword overrides win).

    Starts a scheduler in this process; submits no job until it is scaled.
    """
    return _import_jobqueue().SLURMCluster(**{k: v for k, v in overrides.items() if v is not None})


def helm_dask_command(manifest, out, address, extra=()) -> list[str]:
    """The client command: this interpreter's helm-dask, so client and workers run the same versions."""
    return [
        sys.executable,
        "-m",
        "helm_dask.cli",
        "run",
        os.fspath(manifest),
        "--out",
        os.fspath(out),
        "--scheduler",
        address,
        *extra,
    ]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="helm-dask manifest (.yaml/.csv) on shared storage")
    p.add_argument("--out", required=True, help="output folder on shared storage")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="dask-jobqueue YAML (default: beside this file)")
    p.add_argument("--jobs", type=int, default=4, help="worker jobs to keep running (default 4)")
    p.add_argument("--queue", help="SLURM partition (overrides the config)")
    p.add_argument("--account", help="SLURM account (overrides the config)")
    p.add_argument("--walltime", help="per worker job, e.g. 12:00:00 (overrides the config)")
    p.add_argument(
        "--wait-workers",
        type=int,
        default=1,
        help="start helm-dask once this many workers are up (default 1; helm-dask sizes some parallel "
        "steps by the workers present when they start)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the worker job script and the client command; submit nothing"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if not 0 <= args.wait_workers <= args.jobs:
        p.error("--wait-workers must be between 0 and --jobs")

    doc = load_jobqueue_config(args.config)
    with jobqueue_config(doc):
        return _run(args, extra)


def _run(args, extra) -> int:
    cluster = make_cluster(queue=args.queue, account=args.account, walltime=args.walltime)
    try:
        cmd = helm_dask_command(
            Path(args.manifest).resolve(), Path(args.out).resolve(), cluster.scheduler_address, extra
        )
        if args.dry_run:
            print(cluster.job_script())
            print("# client command:")
            print(shlex.join(cmd))
            return 0
        # adapt() rather than scale(): it also replaces jobs that reach their walltime or get preempted.
        cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
        print(
            f"scheduler {cluster.scheduler_address}  dashboard {cluster.dashboard_link}  jobs {args.jobs}", flush=True
        )
        if args.wait_workers:
            print(f"waiting for {args.wait_workers} worker(s) (squeue --me shows the jobs)", flush=True)
            with Client(cluster) as client:
                client.wait_for_workers(args.wait_workers)
        print("running: " + shlex.join(cmd), flush=True)
        return subprocess.call(cmd)
    finally:
        cluster.close()  # cancels the worker jobs


if __name__ == "__main__":
    sys.exit(main())
