"""The notebooks in notebooks/: committed without outputs, every cell executes, and the first one stays bounded.

Each notebook is executed top to bottom in a fresh Jupyter kernel (nbclient; a failing cell fails the test), with
its parameter cell (tagged "parameters") overridden by a cell injected right after it, as papermill does.

Memory: notebook 01 explores a phantom store at 0.2 mm (960 x 410 x 650 = 256 M voxels: 1.02 GB as float32),
written beforehand by this test exactly as the notebook's own cell writes it (which the notebook then finds
complete and reuses; the writing path itself runs in the 1 mm execution test -- the store writer's working set,
a few chunks per thread, is not what is measured here). A separate process samples the private resident memory
(RSS minus file-backed shared pages, i.e. what the kernel allocated, not the shared libraries it maps) of the
kernel and all its children every 20 ms; its growth over the kernel's footprint after the imports must stay
below half of one full-resolution volume. A cell that loaded the scan (or any full-resolution volume) would add
at least 1 GB. (The sampler is a process, not a thread of this one: a polling thread here can starve
nbclient's ZeroMQ event loop.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import psutil
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600

_SAMPLER = r"""
import os, sys, time, psutil
parent, out = psutil.Process(int(sys.argv[1])), sys.argv[2]
me, peak = os.getpid(), -1
while True:
    total = 0
    for p in parent.children(recursive=True):
        if p.pid == me:
            continue
        try:
            mi = p.memory_info()
            total += mi.rss - mi.shared
        except psutil.Error:
            pass
    if total > peak:
        peak = total
        with open(out + ".tmp", "w") as fh:
            fh.write(str(peak))
        os.replace(out + ".tmp", out)
    time.sleep(0.02)
"""


def _private_memory_of_children(exclude: set[int] = frozenset()) -> int:
    total = 0
    for p in psutil.Process().children(recursive=True):
        if p.pid in exclude:
            continue
        try:
            mi = p.memory_info()
            total += mi.rss - mi.shared
        except psutil.Error:
            pass
    return total


def _load(path: Path, params: str) -> nbformat.NotebookNode:
    nb = nbformat.read(str(path), as_version=4)
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(idx) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx[0] + 1, cell)
    return nb


def _client(nb, cwd: Path) -> NotebookClient:
    return NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if kind in o.get("data", {})]


def _text(nb) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )


def test_there_are_three_notebooks_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_explore_volume.ipynb",
        "02_pipeline_step_by_step.ipynb",
        "03_label_maps_and_synthesis.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs: clear them"
                assert "execution" not in cell.metadata
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, checks",
    [
        ("01_explore_volume.ipynb", ["shape [192, 82, 130]", "drawn from level 0", "dask dashboard: http"]),
        (
            "02_pipeline_step_by_step.ipynb",
            [
                "brain mask vs truth: Dice",
                "fitted vs true log bias",
                "centroids:",
                "punched voxels",
                "mirror plane vs true medial plane",
                "whole brain",
            ],
        ),
        ("03_label_maps_and_synthesis.ipynb", ["pipeline: ok", "L_hypothalamus_posterior", "Fornix"]),
    ],
)
def test_notebook_executes(name, checks, tmp_path):
    """Every cell runs with the committed parameters (only WORKDIR is redirected to a temporary folder)."""
    nb = _load(ROOT / "notebooks" / name, f"WORKDIR = {str(tmp_path / 'work')!r}")
    _client(nb, tmp_path).execute()  # raises CellExecutionError if any cell fails
    text = _text(nb)
    for needle in checks:
        assert needle in text, f"{name}: expected {needle!r} in the printed output"
    assert len(_outputs(nb, "image/png")) >= 4
    if name.startswith("02"):
        dice = float(text.split("brain mask vs truth: Dice ")[1].split(",")[0])
        corr = float(text.split("inside the brain: correlation ")[1].split(",")[0])
        assert dice > 0.98 and corr > 0.9, (dice, corr)


@pytest.mark.notebook
@pytest.mark.slow
def test_first_notebook_explores_a_big_volume_without_loading_it(tmp_path):
    """Notebook 01 at 0.2 mm: the kernel's private memory grows by less than half of one full volume."""
    spacing = 0.2
    from helm_dask.io import save_volume
    from helm_dask.phantom import phantom, phantom_geometry

    shape = phantom_geometry(spacing)["shape"]
    volume_bytes = int(np.prod(shape)) * 4  # the float32 scan: 1.02 GB
    vols = phantom(spacing, side="L")  # the notebook's own store layout and names
    for name in ("scan", "truth_mask", "hypothalamus"):
        save_volume(vols[name], str(tmp_path / "work" / f"phantom_{spacing:g}mm" / name))
    nb = _load(
        ROOT / "notebooks" / "01_explore_volume.ipynb", f"SPACING_MM = {spacing}\nWORKDIR = {str(tmp_path / 'work')!r}"
    )
    client = _client(nb, tmp_path)
    peak_file = tmp_path / "peak.txt"
    baseline = sampler = None
    t0 = time.perf_counter()
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
                if sampler is None and "from helm_dask.view import" in cell.source:
                    baseline = _private_memory_of_children()
                    sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid()), str(peak_file)])
                    while not peak_file.exists():
                        time.sleep(0.01)
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait(timeout=30)
    assert baseline is not None, "the imports cell was not found"
    peak = int(peak_file.read_text())
    growth = peak - baseline
    print(
        f"\n01 at {spacing} mm: {shape} = {volume_bytes / 1e6:.0f} MB per full volume; kernel private memory "
        f"{baseline / 1e6:.0f} MB after imports, peak {peak / 1e6:.0f} MB (+{growth / 1e6:.0f} MB), "
        f"{time.perf_counter() - t0:.0f} s"
    )
    assert growth < volume_bytes / 2, (baseline, peak, volume_bytes)
    # and it did what it says: described the 256 M voxel store, drew from the pyramid, made the histogram
    text = _text(nb)
    assert f"shape {list(shape)}" in text and "drawn from level 1" in text
    assert "dask dashboard: http" in text
    assert len(_outputs(nb, "image/png")) >= 4
    # the slice browser: a widget when ipywidgets is installed (`.[notebooks]`), else a printed note
    try:
        import ipywidgets  # noqa: F401

        expected_widgets = 1
    except ImportError:
        expected_widgets = 0
    assert len(_outputs(nb, "application/vnd.jupyter.widget-view+json")) == expected_widgets
