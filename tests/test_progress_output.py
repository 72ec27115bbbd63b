"""Progress output and the dashboard: what a user watching a long run sees.

* :class:`helm_dask.progress.Progress` prints one line per 10% (percentages that increase to 100%, each with the
  elapsed time and, before 100%, an ETA) when stderr is not a terminal, redraws one bar in a terminal (a fake
  ``isatty``), and nothing when quiet;
* a stage's batched writes and passes (:func:`helm_dask.io.store.store_batched`, ``compute_batched``) count every
  chunk exactly once on the stage's tracker, in process and on a distributed cluster, with values identical to
  an uncounted computation;
* ``helm-dask run`` with stderr to a file prints the stages' 10% lines; with ``--quiet`` it prints nothing;
* the dashboard link that a LocalCluster run prints serves the real (bokeh) dashboard, and a scheduler without
  bokeh gets no link.
"""

from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

from helm_dask import progress as progress_mod
from helm_dask.progress import Progress, StageProgress, current, format_duration, stage_progress

LINE = re.compile(
    r"^(?P<desc>.+?): +(?P<pct>\d+)% \((?P<done>\d+)/(?P<total>\d+)(?: (?P<unit>\w+))?\) "
    r"(?P<elapsed>\S+) elapsed(?:, ETA (?P<eta>\S+))?$"
)


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _parsed(text: str) -> list[dict]:
    rows = []
    for ln in text.splitlines():
        m = LINE.match(ln)
        assert m, f"not a progress line: {ln!r}"
        rows.append(m.groupdict())
    return rows


def _check_decades(rows: list[dict]) -> None:
    """Percentages strictly increase to 100; every line before 100% has an ETA, the 100% line none."""
    pcts = [int(r["pct"]) for r in rows]
    assert pcts == sorted(set(pcts)) and pcts[-1] == 100, pcts
    assert all(r["eta"] for r in rows[:-1]) and rows[-1]["eta"] is None
    assert int(rows[-1]["done"]) == int(rows[-1]["total"])


# ---- the Progress class -------------------------------------------------------------------------------------------


def test_lines_every_ten_percent_when_not_a_terminal():
    out = io.StringIO()
    with Progress(50, "writing x.nii.gz", unit="slabs", stream=out) as p:
        for _ in range(50):
            p.update(1)
    rows = _parsed(out.getvalue())
    assert [int(r["pct"]) for r in rows] == list(range(10, 101, 10))
    assert [int(r["done"]) for r in rows] == list(range(5, 51, 5))
    assert {r["desc"] for r in rows} == {"writing x.nii.gz"} and {r["unit"] for r in rows} == {"slabs"}
    _check_decades(rows)


def test_uneven_steps_one_line_per_decade_reached():
    out = io.StringIO()
    with Progress(7, "x", stream=out) as p:
        for n in (1, 3, 3):  # 14%, 57%, 100%
            p.update(n)
    assert [int(r["pct"]) for r in _parsed(out.getvalue())] == [14, 57, 100]


def test_quiet_prints_nothing(capsys):
    with Progress(10, "x", quiet=True) as p:
        p.update(10)
    with stage_progress("[s] kmeans", outputs=2, chunks_per_output=5, quiet=True) as t:
        assert current() is None  # the stores then skip counting altogether
        t.update(10)
    assert capsys.readouterr().err == ""


def test_terminal_bar_is_redrawn(monkeypatch):
    monkeypatch.setattr(progress_mod, "REDRAW_S", 0.0)
    out = FakeTTY()
    with Progress(20, "[s] bias", unit="chunks", stream=out) as p:
        for _ in range(20):
            p.update(1)
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 21 and text.endswith("\n")  # one frame per update and the final one, then a newline
    assert "\n" not in "".join(frames)[:-1]  # all on one line
    pcts = [int(re.search(r"\] +(\d+)%", f).group(1)) for f in frames]
    assert pcts == sorted(pcts) and pcts[0] == 5 and pcts[-1] == 100
    assert frames[-1].startswith("[s] bias [" + "#" * 30 + "] 100% (20/20 chunks)")


def test_stage_tracker_estimates_and_never_goes_back():
    out = io.StringIO()
    with StageProgress("[s] resample", outputs=3, chunks_per_output=100, stream=out) as t:
        assert t.total == 300  # the guess: chunks of the volume the stage reads
        t.begin_outputs([40])  # the first store: the working grid is smaller; the rest count the same
        assert t.total == 120
        t.update(40)
        t.begin_pass(60)  # a pass the guess did not know of: the total grows, the percentage does not fall
        t.update(30)
        t.begin_outputs([40, 40])
        t.update(30 + 80)
    rows = _parsed(out.getvalue())
    _check_decades(rows)
    assert rows[0]["pct"] == "33" and rows[-1]["done"] == rows[-1]["total"] == "180"


def test_eta_leaves_out_uncounted_work(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_mod, "_now", lambda: clock[0])
    t = StageProgress("x", outputs=1, chunks_per_output=10, quiet=True)
    clock[0] = 100.0  # a model fitted for 100 s, nothing counted
    t.begin_outputs([10])
    clock[0] = 104.0
    t.update(4)  # 4 chunks in 4 s
    assert t.eta_s() == pytest.approx(6.0)
    assert format_duration(t.eta_s()) == "6s" and format_duration(3725) == "1h02m"


# ---- a stage's batched writes and passes ----------------------------------------------------------------------------


def _stage_writes(tmp_path: Path, tag: str) -> tuple[str, list, list]:
    """A batched pass of sums, then two 32x32x32 volumes (8^3 chunks: 64 each) written in batches of 8 chunks."""
    from helm_dask.io.store import compute_batched, store_batched

    x = da.random.default_rng(0).random((32, 32, 32), chunks=8).astype("f4")
    sources = [x, (x * 2).astype("f4")]
    targets = [
        zarr.create_array(str(tmp_path / f"{tag}{i}.zarr"), shape=x.shape, chunks=(8, 8, 8), dtype="f4")
        for i in range(2)
    ]
    out = io.StringIO()
    with stage_progress("[s] stage", outputs=2, chunks_per_output=64, stream=out) as tracker:
        sums = compute_batched([x.sum(axis=2, keepdims=True)], batch_chunks=8)  # a fit's pass comes first
        store_batched(sources, targets, batch_chunks=8)
        assert tracker.done == 2 * 64 + 16  # every chunk counted once: two stores and the pass (4 x 4 x 1 chunks)
    expected = x.compute()
    for i, t in enumerate(targets):
        np.testing.assert_array_equal(t[:], expected * (i + 1))
    np.testing.assert_array_equal(sums[0], x.sum(axis=2, keepdims=True).compute())  # as uncounted, bit for bit
    return out.getvalue(), targets, sums


def test_stage_counts_every_chunk_in_process(tmp_path):
    with dask.config.set(scheduler="threads"):
        text, _, _ = _stage_writes(tmp_path, "t")
    rows = _parsed(text)
    _check_decades(rows)
    assert len(rows) == 10 and rows[-1]["total"] == "144"


@pytest.fixture(scope="module")
def cluster_client():
    """A LocalCluster like the one `helm-dask run` starts (worker processes, dashboard on localhost)."""
    from helm_dask.cluster import ClusterOptions, compute_context

    err = io.StringIO()
    saved, sys.stderr = sys.stderr, err
    try:
        ctx = compute_context(ClusterOptions(workers=1))
        client = ctx.__enter__()
    finally:
        sys.stderr = saved
    yield client, err.getvalue()
    ctx.__exit__(None, None, None)


def test_stage_counts_every_chunk_on_a_cluster(tmp_path, cluster_client):
    client, _ = cluster_client
    assert client is not None and dask.config.get("scheduler", None) not in ("threads", "synchronous")
    text, _, _ = _stage_writes(tmp_path, "d")  # chunk futures counted client-side as they complete
    _check_decades(_parsed(text))


def test_dashboard_link_serves_the_dashboard(cluster_client):
    _, printed = cluster_client
    m = re.search(r"dashboard (http://\S+)$", printed.strip())
    assert m, printed
    with urllib.request.urlopen(m.group(1), timeout=30) as r:
        page = r.read().decode()
        assert r.status == 200
    assert "needs bokeh" not in page and "<title>Dask" in page and "bokeh" in page.lower()


def test_no_link_to_a_dashboard_without_bokeh():
    """A scheduler without bokeh serves distributed's "Dask needs bokeh" page, one started with --no-dashboard
    answers 404: neither gets a link."""
    from distributed.http.scheduler.missing_bokeh import BOKEH_REQUIREMENT

    from helm_dask.cluster import _dashboard_link, dashboard_status

    class MissingBokeh(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/none/"):
                self.send_error(404)
                return
            body = f"<p>Dask needs {BOKEH_REQUIREMENT} for the dashboard.</p>".encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), MissingBokeh)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        link = f"http://127.0.0.1:{server.server_port}/status"
        assert dashboard_status(link) == "no-bokeh"

        class RemoteClient:  # what _dashboard_link reads of a client joined to a remote scheduler
            cluster = None
            dashboard_link = link

            def scheduler_info(self):
                return {"services": {"dashboard": server.server_port}}

        shown = _dashboard_link(RemoteClient())
        assert "http" not in shown and "bokeh" in shown
        RemoteClient.dashboard_link = f"http://127.0.0.1:{server.server_port}/none/status"
        assert dashboard_status(RemoteClient.dashboard_link) == "missing"
        assert _dashboard_link(RemoteClient()) == "(no dashboard)"
    finally:
        server.shutdown()


# ---- the command line ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from helm_dask.phantom_io import write_phantom

    ph = tmp_path_factory.mktemp("progress") / "ph"
    write_phantom(ph, spacing_mm=2.0, side="L", seed=1)
    return ph


def _run(phantom: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        *("run", phantom / "scan.nii.gz", "--hypothalamus", phantom / "hypothalamus.nii.gz", "--out", out),
        *("--spacing", "2.5", "--k", "4,6", "--chunks", "16", "--scheduler", "threads", "--no-qc", *extra),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "helm_dask.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
@pytest.mark.e2e
def test_run_prints_stage_progress_and_quiet_prints_nothing(phantom, tmp_path):
    res = _run(phantom, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    by_stage: dict[str, list] = {}
    for row in _parsed(res.stderr):  # stderr (a file here, not a terminal) holds progress lines only
        by_stage.setdefault(row["desc"], []).append(row)
    for stage in ("background", "resample", "bias", "kmeans", "merge", "mirror"):
        rows = by_stage.pop(f"[scan] {stage}")
        _check_decades(rows)
        assert len(rows) >= 5 and {r["unit"] for r in rows} == {"chunks"}, (stage, rows)
    # what is left: the import's reading and the NIfTI exports, each to 100%
    assert any(d.startswith("reading ") for d in by_stage) and any(d.startswith("writing ") for d in by_stage)
    for desc, rows in by_stage.items():
        assert int(rows[-1]["pct"]) == 100, (desc, rows)

    quiet = _run(phantom, tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout == ""


@pytest.mark.slow
@pytest.mark.e2e
def test_run_redraws_one_bar_per_stage_in_a_terminal(phantom, tmp_path, monkeypatch):
    from helm_dask.cluster import ClusterOptions, compute_context
    from helm_dask.pipeline import RunParams, run_subject

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    params = RunParams(
        scan=str(phantom / "scan.nii.gz"),
        hypothalamus=str(phantom / "hypothalamus.nii.gz"),
        out=str(tmp_path / "out"),
        spacing=2.5,
        until="preprocess",
        chunks=(16, 16, 16),
        nifti=False,
        qc=False,
    )
    with compute_context(ClusterOptions(scheduler="threads")):
        run_subject(params, log=lambda m: None)
    lines = tty.getvalue().split("\n")
    bars = [ln for ln in lines if "[scan] " in ln]
    assert [re.match(r"\r\[scan\] (\w+)", b).group(1) for b in bars] == ["background", "resample", "bias"]
    for bar in bars:  # each stage: one line, redrawn in place, the percentage rising to 100
        frames = [f for f in bar.split("\r") if f]
        pcts = [int(m.group(1)) for f in frames if (m := re.search(r"\] +(\d+)%", f))]
        assert len(pcts) >= 2 and pcts == sorted(pcts) and pcts[-1] == 100, bar
