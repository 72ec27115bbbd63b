"""The graphs the stages submit: dask's linear fusion leaves an alias task per fused chain, which
helm_dask.cluster.optimize_arrays folds into the task it names (one task per chunk written, same values)."""

from __future__ import annotations

import dask
import dask.array as da
import distributed
import numpy as np
import zarr
from dask._task_spec import Alias, Task, TaskRef
from dask.core import flatten
from dask.utils import key_split

from helm_dask.cluster import ClusterOptions, compute_context, fold_aliases, optimize_arrays
from helm_dask.io.store import _stored_together, store_batched


def _written(tmp_path, name):
    target = zarr.create_array(str(tmp_path / name), shape=(48, 40, 32), chunks=(16, 16, 16), dtype="u2")
    rng = np.random.default_rng(0)
    src = da.from_array(rng.integers(0, 9, (48, 40, 32), dtype=np.uint16), chunks=16)
    return target, _stored_together([src + 1, src * 2], [target, target], None)


def test_store_graph_has_one_task_per_chunk_and_the_same_values(tmp_path):
    target, written = _written(tmp_path, "a")
    box = written[:2, :3, :2]  # a batch of store_batched: a box of the one-voxel-per-chunk writer
    (plain,) = dask.optimize(box)
    kinds = {type(v).__name__ for v in dict(plain.__dask_graph__()).values()}
    assert "Alias" in kinds  # dask's own optimisation: a fused task and an alias per chunk
    assert len(dict(plain.__dask_graph__())) == 2 * 12
    with dask.config.set(array_optimize=optimize_arrays):
        (folded,) = dask.optimize(box)
        graph = dict(folded.__dask_graph__())
        assert len(graph) == 12 and not any(isinstance(v, Alias) for v in graph.values())
        assert set(graph) == set(flatten(box.__dask_keys__()))  # the keys the caller waits for
        assert {key_split(k) for k in graph} == {"getitem"}
        box.compute(scheduler="sync")
    got = target[:32, :40, :32]
    other, w2 = _written(tmp_path, "b")
    w2[:2, :3, :2].compute(scheduler="sync")  # dask's default graph
    np.testing.assert_array_equal(got, other[:32, :40, :32])
    assert got.any()


def test_fold_keeps_shared_targets_and_asked_keys():
    g = {
        "a": Alias("a", "t1"),
        "t1": Task("t1", sum, [1, 2]),
        "b": Alias("b", "t2"),  # t2 is also used by c: folding it into b would run it twice
        "c": Task("c", max, 1, TaskRef("t2")),
        "t2": Task("t2", sum, [3, 4]),
        "d": Alias("d", "t3"),  # t3 is asked for: it must keep its key
        "t3": Task("t3", sum, [5, 6]),
    }
    out = fold_aliases(g, ["a", "b", "c", "d", "t3"])
    assert sorted(out) == ["a", "b", "c", "d", "t2", "t3"]
    assert isinstance(out["a"], Task) and out["a"].key == "a" and out["a"]() == 3
    assert isinstance(out["b"], Alias) and isinstance(out["d"], Alias)


def test_distributed_scheduler_runs_one_task_per_chunk(tmp_path):
    target, written = _written(tmp_path, "c")
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc,
        distributed.Client(lc) as client,
        dask.config.set(array_optimize=optimize_arrays),
    ):
        stored = client.persist(written)
        distributed.wait(stored)
        n = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    assert n == written.npartitions == 3 * 3 * 2


def test_compute_context_sets_the_folding_optimisation(tmp_path):
    with compute_context(ClusterOptions(scheduler="threads", quiet=True)):
        assert dask.config.get("array_optimize") is optimize_arrays
        target = zarr.create_array(str(tmp_path / "d"), shape=(32, 32, 32), chunks=(16, 16, 16), dtype="u2")
        store_batched([da.ones((32, 32, 32), chunks=16, dtype="u2")], [target], batch_chunks=4)
    assert dask.config.get("array_optimize", None) is not optimize_arrays
    assert int(target[:].sum()) == 32**3
