"""Where the Dask work runs: a LocalCluster sized from the options, an existing cluster, or in-process threads.

Every command that computes goes through :func:`compute_context`. The default is a ``dask.distributed``
LocalCluster of worker *processes* with a memory limit each, so that the memory bound of a stage is enforced
and measurable; ``--scheduler tcp://HOST:PORT`` (or a scheduler JSON file) joins a running cluster;
``--scheduler threads`` / ``synchronous`` run in this process without distributed (handy on tiny inputs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import dask

LOCAL_SCHEDULERS = ("threads", "synchronous")


@dataclass
class ClusterOptions:
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    dashboard: str = "127.0.0.1:0"  # localhost only unless asked otherwise
    quiet: bool = False


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def compute_context(opts: ClusterOptions | None = None):
    """Context manager yielding a ``distributed.Client`` (or None for in-process schedulers)."""
    opts = opts or ClusterOptions()
    # Stages ship small fitted models (the bag-removal coarse model is ~35 MB, whatever the volume size) once per
    # graph; distributed's advice about large graphs is not actionable for users, so keep it out of their output.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    if opts.scheduler in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=opts.scheduler):
            yield None
        return
    from distributed import Client, LocalCluster

    if opts.scheduler:
        target = opts.scheduler
        if os.path.isfile(target):
            client = Client(scheduler_file=target)
        else:
            client = Client(target)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=opts.workers or default_workers(),
                               threads_per_worker=opts.threads_per_worker or 1,
                               memory_limit=opts.memory_limit or "auto", processes=True,
                               dashboard_address=opts.dashboard, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        if not opts.quiet:
            link = client.dashboard_link if getattr(client, "dashboard_link", None) else "(no dashboard)"
            nthreads = sum(client.nthreads().values())
            print(f"dask: {len(client.nthreads())} worker(s), {nthreads} thread(s); dashboard {link}",
                  file=sys.stderr, flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
