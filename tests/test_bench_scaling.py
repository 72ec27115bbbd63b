"""``bench/scaling.py`` (issue 21): the 2-worker / 1-worker comparison it prints from a pipeline run's rows."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from bench_module import load  # tests/ helper module

FIELDS = ["commit", "stage", "spacing_mm", "workers", "wall_s", "note"]


@pytest.fixture(scope="module")
def scaling():
    return load("scaling")


def _run(workers: int, stages: dict[str, tuple[float, float, float]], total: float, note: str = "pair") -> list[dict]:
    rows = [
        {
            "commit": "abc1234",
            "stage": f"pipeline:{name}",
            "spacing_mm": "0.3",
            "workers": str(workers),
            "wall_s": str(wall),
            "note": f"{note}; peak MB by process: client=400; CPU s: client {client}, workers {wk}",
        }
        for name, (wall, client, wk) in stages.items()
    ]
    rows.append(
        {
            "commit": "abc1234",
            "stage": "pipeline:total(until mirror)",
            "spacing_mm": "0.3",
            "workers": str(workers),
            "wall_s": str(total),
            "note": note,
        }
    )
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_the_ratio_the_extra_cpu_and_the_perfect_schedule(scaling, tmp_path, capsys):
    one = _run(
        1, {"import": (10.0, 6.0, 5.0), "export a.nii.gz": (4.0, 1.0, 3.0), "export b.nii.gz": (6.0, 1.0, 5.0)}, 22.0
    )
    old = _run(2, {"import": (99.0, 9.0, 9.0), "export a.nii.gz": (9.0, 9.0, 9.0)}, 120.0)  # an earlier 2-worker run
    two = _run(
        2, {"import": (8.0, 6.0, 6.0), "export a.nii.gz": (2.0, 1.0, 3.3), "export b.nii.gz": (3.0, 1.0, 5.5)}, 15.0
    )
    csv_path = _write(tmp_path / "results.csv", one + old + two)
    assert scaling.main(["--commit", "abc1234", "--spacing", "0.3", "--results", str(csv_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    imp = next(line for line in out if line.startswith("import")).split()
    assert imp[1:4] == ["10.0", "8.0", "1.25x"] and imp[8] == "+20%"  # workers 5.0 -> 6.0 CPU s
    exports = next(line for line in out if line.startswith("exports")).split()
    assert exports[1:4] == ["10.0", "5.0", "2.00x"] and exports[8] == "+10%"  # the exports summed: 8.0 -> 8.8
    assert next(line for line in out if line.startswith("whole run")).split()[2:5] == ["22.0", "15.0", "1.47x"]
    # the 2-worker run's CPU: 6 + 6 + 1 + 3.3 + 1 + 5.5 = 22.8 s -> 11.4 s on two busy cores -> 22.0 / 11.4
    assert out[-1].startswith("2-worker run's CPU 22.8 s") and "11.4 s, a ratio of 1.93x" in out[-1]


def test_no_matching_pair_is_an_error(scaling, tmp_path, capsys):
    csv_path = _write(tmp_path / "results.csv", _run(1, {"import": (1.0, 1.0, 1.0)}, 1.0))
    assert scaling.main(["--commit", "abc1234", "--spacing", "0.3", "--results", str(csv_path)]) == 1
    assert "no 1-worker and 2-worker runs match" in capsys.readouterr().err


def test_rows_without_cpu_seconds_are_an_error(scaling, tmp_path, capsys):
    rows = _run(1, {"import": (1.0, 1.0, 1.0)}, 1.0) + _run(2, {"import": (1.0, 1.0, 1.0)}, 1.0)
    rows[-2]["note"] = "pair; peak MB by process: client=400"  # the 2-worker import, recorded before 3819ba0
    csv_path = _write(tmp_path / "results.csv", rows)
    assert scaling.main(["--commit", "abc1234", "--spacing", "0.3", "--results", str(csv_path)]) == 1
    assert "pipeline:import at abc1234 carries no CPU seconds" in capsys.readouterr().err
