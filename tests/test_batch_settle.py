"""Batched writes on a distributed scheduler wait for their own previous batch only (helm_dask.io.store).

Between two batches :func:`helm_dask.io.store.store_batched` waits until the scheduler has forgotten the previous
batch (dask/dask#9888). It used to wait for the scheduler's whole task count to fall back, so with another
subject's tasks in flight (``run MANIFEST --concurrent-subjects``) every batch waited its full timeout.
"""

from __future__ import annotations

import threading
import time

import dask.array as da
import numpy as np
import pytest
import zarr

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cl,
        distributed.Client(cl) as c,
    ):
        yield c


_RELEASE = threading.Event()  # the in-process workers' foreign tasks run until the test sets it


def _busy(seconds: float) -> bool:
    return _RELEASE.wait(seconds)


@pytest.fixture
def foreign(client):
    """Another subject's task, in flight on one worker until the test ends."""
    _RELEASE.clear()
    fut = client.submit(_busy, 60.0, pure=False)
    yield fut
    _RELEASE.set()
    fut.result()


def test_settle_ignores_other_work_on_the_scheduler(client):
    from helm_dask.io import store

    settle = store._scheduler_settler()
    _RELEASE.clear()
    other = client.submit(_busy, 60.0, pure=False)  # another subject starts a task after this one's first batch
    store._LAST_BATCH.keys = ["a-key-this-thread-never-submitted"]
    try:
        t0 = time.monotonic()
        settle(30.0)
        assert time.monotonic() - t0 < 5.0  # the old rule (the task count back to its start) waited 30 s
    finally:
        store._LAST_BATCH.keys = None
        _RELEASE.set()
        other.result()


def test_batches_record_their_own_keys_and_write_everything(client, foreign, tmp_path):
    from helm_dask.io import store

    x = np.arange(24 * 24 * 24, dtype=np.float32).reshape(24, 24, 24)
    t = zarr.create_array(str(tmp_path / "t.zarr"), shape=x.shape, chunks=(8, 8, 8), dtype=np.float32)
    t0 = time.monotonic()
    store.store_batched([da.from_array(x, chunks=8) + 1], [t], batch_chunks=3)  # 9 batches
    took = time.monotonic() - t0
    np.testing.assert_array_equal(t[...], x + 1)
    keys = store._LAST_BATCH.keys
    assert keys and all(isinstance(k, tuple) for k in keys)  # the last batch's chunk keys
    assert took < 9 * 5.0 / 2  # no batch waited out its 5 s timeout for the foreign task


def test_the_record_is_per_thread(client):
    from helm_dask.io import store

    store._LAST_BATCH.keys = ["mine"]
    seen = []
    th = threading.Thread(target=lambda: seen.append(getattr(store._LAST_BATCH, "keys", None)))
    th.start()
    th.join()
    assert seen == [None]
    store._LAST_BATCH.keys = None
