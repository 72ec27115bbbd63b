"""The workers' malloc settings (helm_dask.cluster.keep_freed_memory and the trims): set where glibc is the
allocator, and a started cluster's workers trim on a timer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helm_dask import cluster

glibc = pytest.mark.skipif(cluster.free_heap_bytes() is None, reason="malloc is not glibc's (>= 2.33)")


@glibc
def test_freed_memory_is_reused_without_page_faults():
    """In a fresh process started as distributed starts its workers (``MALLOC_TRIM_THRESHOLD_`` set): each new
    8 MB buffer is a fresh mapping, 2048 page faults when filled; after keep_freed_memory the one freed below
    later allocations (as in a worker's busy heap; the top of the heap is still trimmed) is reused, and a trim
    still works."""
    code = (
        "import os, resource, numpy as np; from helm_dask import cluster as c\n"
        "def faults():\n"
        "    f0, pins = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []\n"
        "    for _ in range(20):\n"
        "        a = np.empty(2**20); a[:] = 1.0; pins.append(np.ones(2**15)); del a\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0\n"
        "before = faults()\n"
        "assert c.keep_freed_memory()\n"
        "after = faults()\n"
        "assert c.trim_memory() in (True, False) and c.free_heap_bytes() >= 0\n"
        "print(before, after)\n"
    )
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "NUMPY_MADVISE_HUGEPAGE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before >= 20 * 2048 * 0.9 and after <= 2 * 2048, (before, after)


@glibc
def test_local_cluster_workers_trim_on_a_timer():
    from distributed import Client

    with cluster.start_local_cluster(cluster.ClusterOptions(workers=1, dashboard=None)) as lc, Client(lc) as client:
        state = client.run(
            lambda dask_worker: (
                "helm-dask-trim" in dask_worker.periodic_callbacks
                and dask_worker.periodic_callbacks["helm-dask-trim"].is_running()
            )
        )
        assert list(state.values()) == [True]
        cluster.trim_workers(client)  # best effort, never raises
    cluster.trim_workers(None)
