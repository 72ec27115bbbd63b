"""The command line: contract names and flags, one-line errors with non-zero exits, no partial outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helm_dask.cli import main
from helm_dask.io import open_volume


def run_cli(*args, expect=0, capsys=None):
    code = main([str(a) for a in args])
    assert code == expect, f"exit {code}, expected {expect}"
    return code


@pytest.mark.e2e
def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "helm_dask.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("phantom", "convert", "info", "demo", "run", "compare"):
        assert cmd in out.stdout


@pytest.mark.e2e
def test_phantom_folder_and_store(tmp_path, capsys):
    run_cli("phantom", tmp_path / "ph", "--spacing", 4, "--side", "R", "--seed", 3, "--scheduler", "threads", "--quiet")
    for name in ("scan", "hypothalamus", "truth_mask", "truth_tissue", "truth_bias"):
        assert (tmp_path / "ph" / f"{name}.nii.gz").exists()
    hyp = nib.load(tmp_path / "ph" / "hypothalamus.nii.gz")
    assert hyp.header.get_data_dtype() == np.uint16 and hyp.header.get_intent()[0] == "label"
    codes = set(np.unique(np.asanyarray(hyp.dataobj)).tolist())
    assert codes <= {0, 250, 806, 807, 808, 809, 810} and 808 in codes
    run_cli(
        "phantom", tmp_path / "ph.zarr", "--spacing", 4, "--side", "R", "--seed", 3, "--scheduler", "threads", "--quiet"
    )
    scan = open_volume(tmp_path / "ph.zarr" / "scan")
    # The NIfTI and Zarr outputs hold the same phantom.
    np.testing.assert_array_equal(scan.values, nib.load(tmp_path / "ph" / "scan.nii.gz").get_fdata(dtype=np.float32))
    np.testing.assert_allclose(scan.attrs["affine"], nib.load(tmp_path / "ph" / "scan.nii.gz").affine, atol=1e-5)


@pytest.mark.e2e
def test_phantom_echoes(tmp_path):
    run_cli("phantom", tmp_path / "e.zarr", "--spacing", 6, "--echoes", 4, "--scheduler", "threads", "--quiet")
    assert open_volume(tmp_path / "e.zarr" / "scan").dims == ("x", "y", "z", "echo")


@pytest.mark.e2e
def test_convert_and_info(tmp_path, capsys):
    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    aff = np.array([[0, 0, 0.2, 1], [-0.2, 0, 0, 2], [0, -0.2, 0, 3], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "a.nii.gz")
    run_cli(
        "convert", tmp_path / "a.nii.gz", tmp_path / "a.zarr", "--chunks", "4,4,3", "--scheduler", "threads", "--quiet"
    )
    capsys.readouterr()
    run_cli("info", tmp_path / "a.zarr", "--json")
    d = json.loads(capsys.readouterr().out)
    assert d["shape"] == [6, 7, 8] and d["chunks"] == [4, 4, 3] and d["orientation"] == "".join(nib.aff2axcodes(aff))
    run_cli("info", tmp_path / "a.zarr")
    text = capsys.readouterr().out
    assert "orientation" in text and nib.aff2axcodes(aff)[0] in text


@pytest.mark.parametrize("case", ["missing", "not_nifti", "exists", "5d"])
def test_errors_are_one_line_without_traceback(tmp_path, capsys, case):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), good)
    if case == "missing":
        args = ["convert", tmp_path / "nope.nii.gz", tmp_path / "o.zarr"]
    elif case == "not_nifti":
        (tmp_path / "x.nii").write_text("hello")
        args = ["convert", tmp_path / "x.nii", tmp_path / "o.zarr"]
    elif case == "exists":
        (tmp_path / "o.zarr").mkdir()
        args = ["convert", good, tmp_path / "o.zarr"]
    else:
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2, 2), np.float32), np.eye(4)), tmp_path / "f.nii.gz")
        args = ["convert", tmp_path / "f.nii.gz", tmp_path / "o.zarr"]
    code = main([str(a) for a in args] + ["--scheduler", "threads", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("helm-dask: error: "), err
    assert "Traceback" not in err
    assert not any(p.name.startswith(".o.zarr.tmp") for p in tmp_path.iterdir())


def test_run_requires_hypothalamus(tmp_path, capsys):
    code = main(["run", str(tmp_path / "scan.nii.gz"), "--out", str(tmp_path / "o"), "--scheduler", "threads"])
    assert code == 2 and "--hypothalamus" in capsys.readouterr().err


@pytest.mark.parametrize("k,msg", [("1-3", "between 2 and 20"), ("4-25", "between 2 and 20"), ("a", "integers")])
def test_bad_k(tmp_path, capsys, k, msg):
    code = main(
        [
            "run",
            str(tmp_path / "s.nii.gz"),
            "--hypothalamus",
            str(tmp_path / "h.nii.gz"),
            "--out",
            str(tmp_path),
            "--k",
            k,
            "--scheduler",
            "threads",
        ]
    )
    assert code == 2 and msg in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
def test_convert_on_a_local_cluster(tmp_path, capsys):
    """The default path: a dask.distributed LocalCluster of worker processes, dashboard link printed."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 18, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    run_cli(
        "convert",
        tmp_path / "a.nii.gz",
        tmp_path / "a.zarr",
        "--chunks",
        8,
        "--workers",
        1,
        "--threads-per-worker",
        1,
        "--memory-limit",
        "1GB",
    )
    assert "dashboard" in capsys.readouterr().err
    run_cli("convert", tmp_path / "a.zarr", tmp_path / "b.nii.gz", "--workers", 1, "--quiet")
    assert np.asanyarray(nib.load(tmp_path / "b.nii.gz").dataobj).tobytes() == data.tobytes()


def test_run_mask_and_fluid_flags(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "helm_dask.cli", "run", "--help"], capture_output=True, text=True)
    assert "--mask FILE" in out.stdout and "--fluid {auto,bright,dark,none}" in out.stdout
    manifest = tmp_path / "m.yaml"
    manifest.write_text("subjects: []\n")
    code = main(
        [
            "run",
            str(manifest),
            "--mask",
            str(tmp_path / "m.nii.gz"),
            "--out",
            str(tmp_path / "o"),
            "--scheduler",
            "threads",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "manifest" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["run", "s.nii.gz", "--fluid", "purple"])


def test_subject_names_are_one_safe_folder_name():
    from helm_dask.errors import HelmError
    from helm_dask.pipeline import RunParams

    assert RunParams(scan="/d/sub 01 (T2*).nii.gz", hypothalamus="", out="o").subject_name() == "sub_01_T2"
    assert RunParams(scan="/d/..nii.gz", hypothalamus="", out="o").subject_name() == "subject"
    for bad in ("../x", "/abs", "a/b", ".hidden", "..", "-x"):
        with pytest.raises(HelmError, match="not a safe folder name"):
            RunParams(scan="s.nii.gz", hypothalamus="", out="o", subject=bad).subject_name()


def test_fault_hook_and_memory_limit(monkeypatch):
    import errno

    from helm_dask.cluster import MIN_WORKER_MEMORY, parse_memory_limit
    from helm_dask.io.location import fault
    from helm_dask.io.store import final_path_of

    monkeypatch.setenv("HELM_DASK_FAULT", "ENOSPC@write:kmeans_*")
    fault("write:scan_raw")  # another point: nothing happens
    with pytest.raises(OSError) as ei:
        fault("write:kmeans_k4", "/o/s/helm.zarr/.kmeans_k4.tmp-0123abcdp12h89abcdef/0")
    assert ei.value.errno == errno.ENOSPC
    assert final_path_of(ei.value.filename) == "/o/s/helm.zarr/kmeans_k4"
    assert parse_memory_limit("auto") == "auto" and parse_memory_limit("4GB") == "4GB"
    for bad in ("abc", "60MB", f"{MIN_WORKER_MEMORY - 1}"):
        with pytest.raises(ValueError):
            parse_memory_limit(bad)


def test_help_lists_the_exit_codes():
    from helm_dask.cli import EXIT_CODES, build_parser

    text = build_parser().format_help()
    assert "exit status:" in text and all(f"  {code} " in text for code, _ in EXIT_CODES)
