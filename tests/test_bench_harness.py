"""``bench/harness.py``'s worker-time breakdown (issue 21): what the workers' time went to between two marks."""

from __future__ import annotations

import subprocess
import time

import dask.array as da
import distributed
import pytest
from bench_module import BENCH, load  # tests/ helper module


@pytest.fixture(scope="module")
def harness():
    return load("harness")


def test_no_client_no_breakdown(harness):
    assert harness.WorkerTime(None).mark() == ""


def test_the_tasks_cpu_is_counted_between_marks(harness):
    with distributed.Client(
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    ) as client:
        wt = harness.WorkerTime(client)
        x = da.ones((2048, 2048), chunks=1024)
        assert float((x @ x.T).sum().compute()) == 2048.0**3
        cpu, texts = 0.0, []
        for _ in range(50):  # the metrics come with the workers' heartbeats
            time.sleep(0.2)
            text = wt.mark()  # "" until the first metrics arrive
            if text:
                texts.append(text)
                cpu += float(text.split("execute cpu ")[1].split(",")[0])
            if cpu > 0:
                break
        assert cpu > 0
        assert texts[-1].startswith("worker s: execute cpu ")
        assert "MB served to workers and the client" in texts[-1]


def test_commit_names_uncommitted_code_dirty(harness, tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "helm_dask").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "helm_dask" / "a.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "results.csv").write_text("date\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = harness.commit(tmp_path)
    assert head and "+" not in head
    (tmp_path / "bench" / "results" / "results.csv").write_text("date\nrow\n")  # the rows themselves: clean
    assert harness.commit(tmp_path) == head
    (tmp_path / "helm_dask" / "a.py").write_text("x = 2\n")
    assert harness.commit(tmp_path) == head + "+dirty"


def test_a_checkouts_bench_runs_its_own_package(tmp_path):
    """A second checkout's bench (an A/B run) imports that checkout's helm_dask, not the environment's editable
    install, and names that checkout's commit."""
    import shutil
    import sys

    (tmp_path / "helm_dask").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "helm_dask" / "__init__.py").write_text("WHICH = 'the other checkout'\n")
    shutil.copy(BENCH / "harness.py", tmp_path / "bench" / "harness.py")
    (tmp_path / "bench" / "probe.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.path.insert(0, str(Path(__file__).parent))\n"
        "import harness\nimport helm_dask\nprint(helm_dask.WHICH, harness.commit(), sep='|')\n"
    )
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.strip()
    out = subprocess.run(
        [sys.executable, "bench/probe.py"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == f"the other checkout|{head}"
