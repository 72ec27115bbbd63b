"""``helm-dask run MANIFEST --concurrent-subjects N``: concurrent subjects give the outputs of sequential runs, a
failing subject is reported while the other finishes, output lines stay whole and prefixed, and one subject's
chunk-cache release leaves another's cached chunks alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from bench_module import load  # tests/ helper module

from helm_dask import batch
from helm_dask.io import regions
from helm_dask.phantom_io import write_phantom

ROOT = Path(__file__).resolve().parents[1]
SPACING = 1.0  # mm, input and working grid: small phantoms, the whole pipeline in about a minute


def _identical():
    """bench/identical.py (not a package): its ``diff`` compares two run folders array by array."""
    return load("identical")


def _run(manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "helm_dask.cli", "run", str(manifest), "--out", str(out), "--workers", "2"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom(root / "L", spacing_mm=SPACING, side="L", seed=1)
    write_phantom(root / "R", spacing_mm=SPACING, side="R", seed=2)
    return root


def _manifest(path: Path, rows: list[str], until: str = "mirror") -> Path:
    path.write_text(f"params:\n  spacing: {SPACING}\n  k: 4,6\n  until: {until}\nsubjects:\n" + "".join(rows))
    return path


def _row(ph: Path, side: str, name: str) -> str:
    return f"  - {{scan: {ph}/scan.nii.gz, hypothalamus: {ph}/hypothalamus.nii.gz, side: {side}, subject: {name}}}\n"


@pytest.mark.slow
@pytest.mark.e2e
def test_two_concurrent_subjects_match_sequential_runs(phantoms, tmp_path):
    m = _manifest(tmp_path / "m.yaml", [_row(phantoms / "L", "L", "left"), _row(phantoms / "R", "R", "right")])
    seq = _run(m, tmp_path / "seq")
    assert seq.returncode == 0, seq.stderr
    conc = _run(m, tmp_path / "conc", "--concurrent-subjects", "2")
    assert conc.returncode == 0, conc.stderr
    # every Zarr array's values and attributes, every NIfTI's data and header bytes, every JSON bar timings
    assert _identical().diff(tmp_path / "seq", tmp_path / "conc") == 0
    for name in ("left", "right"):
        nifti = sorted(p.name for p in (tmp_path / "conc" / name).glob("*.nii.gz"))
        assert "hemi_k6.nii.gz" in nifti and nifti == sorted(p.name for p in (tmp_path / "seq" / name).glob("*.nii.gz"))
        a = json.loads((tmp_path / "seq" / name / "run.json").read_text())
        b = json.loads((tmp_path / "conc" / name / "run.json").read_text())
        assert a["transform"] == b["transform"] and a["kmeans"] == b["kmeans"]
    # both subjects' lines are whole (never two subjects on one line) and each names its subject first
    lines = (conc.stdout + conc.stderr).splitlines()
    mentions = [ln for ln in lines if "[left]" in ln or "[right]" in ln]
    assert len(mentions) > 20
    assert not [ln for ln in mentions if "[left]" in ln and "[right]" in ln]
    assert all(ln.startswith(("[left] ", "[right] ")) for ln in mentions)
    stage_lines = [ln for ln in lines if ln.endswith("done in") or ": done in " in ln]
    assert {ln.split("]")[0] for ln in stage_lines} == {"[left", "[right"}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_failing_subject_is_reported_while_the_other_finishes(phantoms, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    (broken / "hypothalamus.nii.gz").write_bytes((phantoms / "L" / "hypothalamus.nii.gz").read_bytes())
    m = _manifest(
        tmp_path / "m.yaml", [_row(broken, "L", "broken"), _row(phantoms / "R", "R", "right")], until="preprocess"
    )
    res = _run(m, tmp_path / "out", "--concurrent-subjects", "2")
    assert res.returncode == 4, res.stderr
    assert "[broken] failed" in res.stderr and "scan.nii.gz" in res.stderr
    summary = {ln.split()[0]: ln.split()[-1] for ln in res.stdout.splitlines() if ln.startswith(("broken", "right"))}
    assert summary["right"] == "ok" and summary["broken"] != "ok"
    meta = json.loads((tmp_path / "out" / "right" / "run.json").read_text())
    assert {"import", "background", "resample", "bias"} <= set(meta["stages"]) and "kmeans" not in meta["stages"]
    assert not (tmp_path / "out" / "broken").exists()  # nothing written for it, no empty folder left behind


def test_release_in_one_subject_keeps_the_other_subjects_cached_chunks():
    regions.release_chunk_caches()
    chunk = np.ones((4, 4, 4), np.float32)
    with regions.cache_owner("sub1"):
        mine = regions._scope_prefix() + "graph"
    with regions.cache_owner("sub10"):
        theirs = regions._scope_prefix() + "graph"
    regions._CACHE.get((mine, (0, 0, 0)), chunk.copy)
    regions._CACHE.get((theirs, (0, 0, 0)), chunk.copy)
    regions._CACHE.get(("no-owner", (0, 0, 0)), chunk.copy)
    with regions.cache_owner("sub1"):
        regions.release_chunk_caches()
    assert set(regions._CACHE.items) == {(theirs, (0, 0, 0)), ("no-owner", (0, 0, 0))}
    assert regions._CACHE.nbytes == 2 * chunk.nbytes
    regions.release_chunk_caches()  # outside any subject: everything
    assert regions._CACHE.nbytes == 0 and not regions._CACHE.items


def test_subject_lines_are_whole_and_prefixed():
    sink = io.StringIO()
    lines = batch._SubjectLines(sink)
    go = threading.Barrier(2)

    def write(name: str) -> None:
        token = batch._SUBJECT.set(name)
        go.wait()
        for i in range(200):
            lines.write(f"step {i}")  # a line in three writes, as print() and partial writers do
            lines.write(" of 200")
            lines.write("\n")
        lines.write(f"[{name}] already prefixed\nno newline at the end")
        lines.finish()
        batch._SUBJECT.reset(token)

    threads = [threading.Thread(target=write, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines.write("outside a subject\n")
    out = sink.getvalue().splitlines()
    assert len(out) == 2 * 202 + 1 and not lines.isatty()
    for name in ("a", "b"):
        mine = [ln for ln in out if ln.startswith(f"[{name}] ")]
        assert mine[:200] == [f"[{name}] step {i} of 200" for i in range(200)]
        assert mine[200:] == [f"[{name}] already prefixed", f"[{name}] no newline at the end"]
    assert out[-1] == "outside a subject"


def test_concurrency_note_warns_beyond_the_worker_threads():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"):
        assert batch.concurrency_note(1) is None
        note = batch.concurrency_note(2)
    assert note is not None and "1 worker thread(s)" in note


def test_an_interrupt_unwinds_every_running_subject(monkeypatch, tmp_path):
    """Ctrl-C in the main thread reaches the subject threads: their ``finally`` blocks run (locks, temporaries),
    no new subject starts, and the interrupt propagates as in a sequential batch."""
    import signal
    import time

    from helm_dask.pipeline import RunParams

    started, unwound = [], []

    def slow_subject(params, *, quiet, debug):
        started.append(params.subject)
        try:
            while True:
                time.sleep(0.01)
        finally:
            unwound.append(params.subject)

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_run_one", slow_subject)
    plan = [(i, RunParams(scan="s", hypothalamus="h", out=str(tmp_path), subject=f"s{i}")) for i in range(3)]
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            batch.run_batch("m.yaml", plan[0][1], quiet=True, plan=plan, concurrent=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted(started) == ["s0", "s1"] and sorted(unwound) == ["s0", "s1"]
    assert sys.stdout is not None and not isinstance(sys.stdout, batch._SubjectLines)
