"""Bad inputs and faults through the real command line, as one table.

Every case runs ``python -m helm_dask.cli ...`` in a fresh folder (its own copy of the inputs, its own ``--out``)
and checks, whatever the command:

* the exit status;
* stderr holds exactly one line besides progress output, naming the offending file or flag (``needle``);
* no Python traceback anywhere;
* ``--out`` holds nothing new (``clean``) or only complete outputs: no temporaries, no lock, every store of
  ``helm.zarr`` finished, every NIfTI file readable to the end;
* the inputs are byte-identical afterwards.

Faults that cannot be made from outside (a full disk without mount rights, a kill at an exact point inside a
stage) use the documented hook ``HELM_DASK_FAULT`` (:func:`helm_dask.io.location.fault`). The interrupted and
killed runs are then resumed and compared, voxel for voxel, with an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

RUN = ["--spacing", "2.5", "--k", "4,6", "--scheduler", "threads", "--quiet"]
PROGRESS = re.compile(r"^(dask: |reading |writing |\[[^\]]+\] (?!failed)|.* done in [0-9.]+s$|.* \.\.\.$)")
TEMPORARY = re.compile(r"^\..*\.(tmp|old)-|\.lock$")


# ----------------------------------------------------------------------------------------------------------------
# Inputs (made once per test process) and an uninterrupted run to compare resumed runs with


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    root = tmp_path_factory.mktemp("world")
    ph = root / "ph"
    write_phantom(ph, spacing_mm=2.0, side="L", seed=1)
    scan = nib.load(ph / "scan.nii.gz")
    extra = root / "extra"
    extra.mkdir()
    nib.save(nib.Nifti1Image(np.ones((10, 12), np.float32), np.eye(4)), extra / "flat2d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((10, 12, 1), np.float32), np.eye(4)), extra / "slice.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3, 2, 2), np.float32), np.eye(4)), extra / "five_d.nii.gz")
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.eye(4)),
        extra / "floats.nii.gz",
    )
    data = np.asanyarray(scan.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, scan.affine), extra / "nan_scan.nii.gz")
    (extra / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    raw = nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4))
    nib.save(raw, extra / "truncated.nii")
    with open(extra / "truncated.nii", "r+b") as f:
        f.truncate(2000)
    hyp = nib.load(ph / "hypothalamus.nii.gz")
    codes = np.asanyarray(hyp.dataobj).copy()
    codes[codes == 803] = 77
    nib.save(nib.Nifti1Image(codes, hyp.affine), extra / "hyp_codes.nii.gz")
    moved = hyp.affine.copy()
    moved[:3, 3] += 7.0
    nib.save(nib.Nifti1Image(np.asanyarray(hyp.dataobj), moved), extra / "hyp_moved.nii.gz")
    (extra / "notes.txt").write_text("not an image\n")
    base = root / "base"
    run_subject(
        RunParams(
            scan=str(ph / "scan.nii.gz"),
            hypothalamus=str(ph / "hypothalamus.nii.gz"),
            out=str(base),
            spacing=2.5,
            ks=(4, 6),
        ),
        quiet=True,
    )
    return {"root": root, "ph": ph, "extra": extra, "base": base / "scan"}


def _copy_inputs(world, dst: Path) -> None:
    shutil.copytree(world["ph"], dst, dirs_exist_ok=True)
    shutil.copytree(world["extra"], dst, dirs_exist_ok=True)
    (dst / "afile").write_text("a regular file where a folder should be\n")


def _hashes(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HELM_DASK_FAULT"}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _cli(args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "helm_dask.cli", *map(str, args)],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=300,
    )


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS.match(ln)]


def assert_only_complete(out: Path) -> None:
    """Nothing unfinished under ``out``: no temporaries or locks, finished stores, readable NIfTI files."""
    from helm_dask.io.store import read_meta

    if not out.exists():
        return
    stray = [str(p) for p in out.rglob("*") if TEMPORARY.search(p.name)]
    assert not stray, stray
    for store in out.rglob("helm.zarr"):
        for vol in store.iterdir():
            if vol.is_dir():
                read_meta(vol)  # raises for an unfinished volume
    for f in out.rglob("*.nii.gz"):
        np.asanyarray(nib.load(f).dataobj)
    for f in out.rglob("*.json"):
        json.loads(f.read_text())


def assert_same_outputs(a: Path, b: Path) -> None:
    """Two subject folders hold the same outputs: file names, voxels of every NIfTI file, JSON results."""
    names = lambda d: {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    assert names(a) == names(b)
    for f in sorted(a.glob("*.nii.gz")):
        x, y = nib.load(f), nib.load(b / f.name)
        assert np.array_equal(np.asanyarray(x.dataobj), np.asanyarray(y.dataobj)), f.name
        assert np.array_equal(x.affine, y.affine), f.name
    for f, key in (("kmeans.json", "results"), ("transform.json", "transform"), ("bias_model.json", "model")):
        assert json.loads((a / f).read_text())[key] == json.loads((b / f).read_text())[key], f


# ----------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    id: str
    args: list  # "{in}" and "{out}" are the case's input folder and --out
    code: int
    needle: str | None = None  # what the error line must name (a file or a flag); None: no error line
    clean: bool = True  # nothing at all new under --out (else: only complete outputs)
    env: dict = field(default_factory=dict)
    setup: Callable | None = None  # setup(case_dir, world) before the command
    check: Callable | None = None  # check(case_dir, world, result) after the standard checks
    killed: bool = False  # kill -9: nothing could clean up (the check resumes, then looks)
    slow: bool = False


def _manifest(text: str, name: str = "m.yaml"):
    def setup(d, world):
        (d / "in" / name).write_text(text.replace("{in}", str(d / "in")))

    return setup


ROW = "{scan: scan.nii.gz, hypothalamus: hypothalamus.nii.gz"


def _subdir_layout(d, world):
    for sub in ("sub01", "sub02"):
        (d / "in" / sub).mkdir()
        for f in ("scan.nii.gz", "hypothalamus.nii.gz"):
            shutil.copy(d / "in" / f, d / "in" / sub / f)


def _two_scans_same_name(d, world):
    _subdir_layout(d, world)
    (d / "in" / "m.yaml").write_text(
        "subjects:\n  - {scan: sub01/scan.nii.gz, hypothalamus: sub01/hypothalamus.nii.gz}\n"
        "  - {scan: sub02/scan.nii.gz, hypothalamus: sub02/hypothalamus.nii.gz}\n"
    )


def _zarr_input(d, world):
    from helm_dask.io import convert

    with _threads():
        convert(d / "in" / "hypothalamus.nii.gz", d / "in" / "hyp.zarr")


def _unfinished_store(d, world):
    _zarr_input(d, world)
    meta = json.loads((d / "in" / "hyp.zarr" / "zarr.json").read_text())
    meta["attributes"]["helm_dask"]["complete"] = False
    (d / "in" / "hyp.zarr" / "zarr.json").write_text(json.dumps(meta))


def _threads():
    import dask

    return dask.config.set(scheduler="threads")


def _existing_out(d, world):
    (d / "out").mkdir(exist_ok=True)
    (d / "out" / "o.zarr").mkdir()
    shutil.copy(world["ph"] / "scan.nii.gz", d / "out" / "scan.nii.gz")


def _from_baseline(*remove):
    """Start from the uninterrupted run's outputs without ``remove`` (volumes of helm.zarr or files): the command
    then recomputes just those, so the fault hits the middle of that stage quickly."""

    def setup(d, world):
        shutil.copytree(world["base"], d / "out" / "scan")
        for name in remove:
            for target in (d / "out" / "scan" / "helm.zarr" / name, d / "out" / "scan" / name):
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()

    return setup


KMEANS = ("kmeans_k4", "kmeans_k6", "kmeans.json")
MIRROR = ("label_map_k4", "label_map_k6", "transform.json", "label_map_k4.nii.gz", "label_map_k6.nii.gz")


def _check_resumed(fault_code):
    """After the faulty run: a plain rerun finishes, leaves nothing unfinished, equals the uninterrupted run."""

    def check(d, world, res):
        assert res.returncode == fault_code, res.stderr
        again = _cli(
            [
                "run",
                d / "in" / "scan.nii.gz",
                "--hypothalamus",
                d / "in" / "hypothalamus.nii.gz",
                "--out",
                d / "out",
                *RUN,
            ],
            d,
        )
        assert again.returncode == 0, again.stderr
        assert not _error_lines(again.stderr), again.stderr
        assert_only_complete(d / "out")
        assert_same_outputs(d / "out" / "scan", world["base"])

    return check


def _check_verify_inputs(d, world, res):
    # labels replaced by other labels of the same size and mtime: a plain rerun reuses the old checksum (and says
    # so in run.json); --verify-inputs notices and recomputes
    img = nib.load(d / "in" / "hypothalamus.nii.gz")
    hyp = d / "in" / "hyp.nii"  # uncompressed: another content of the same size
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), hyp)
    args = [
        "run",
        d / "in" / "scan.nii.gz",
        "--hypothalamus",
        hyp,
        "--out",
        d / "out",
        "--until",
        "preprocess",
        "--no-qc",
        *RUN,
    ]
    assert _cli(args, d).returncode == 0
    st = hyp.stat()
    codes = np.asanyarray(img.dataobj).copy()
    codes[codes == 802] = 801
    nib.save(nib.Nifti1Image(codes, img.affine, img.header), hyp)
    assert hyp.stat().st_size == st.st_size
    os.utime(hyp, ns=(st.st_atime_ns, st.st_mtime_ns))
    plain = _cli(args, d)
    run = json.loads((d / "out" / "scan" / "run.json").read_text())
    assert plain.returncode == 0 and run["stages"]["import"]["status"] == "skipped", plain.stderr
    assert run["input_check"].startswith("size+mtime")
    verified = _cli(args + ["--verify-inputs"], d)
    run = json.loads((d / "out" / "scan" / "run.json").read_text())
    assert verified.returncode == 0 and run["stages"]["import"]["status"] == "computed", verified.stderr
    assert run["input_check"] == "sha256"


def _check_concurrent(d, world, res):
    args = [
        "run",
        d / "in" / "scan.nii.gz",
        "--hypothalamus",
        d / "in" / "hypothalamus.nii.gz",
        "--out",
        d / "out",
        "--spacing",
        "2.5",
        "--k",
        "4,6",
        "--scheduler",
        "threads",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "helm_dask.cli", *map(str, args)],
            cwd=d,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in o + e for o, e in outs)
    assert_only_complete(d / "out")
    assert_same_outputs(d / "out" / "scan", world["base"])


def _check_external_interrupt(signum, code, resume=True):
    """A real signal to the process group (as a terminal sends it) while a stage runs; then resume."""

    def check(d, world, res):
        args = [
            "run",
            d / "in" / "scan.nii.gz",
            "--hypothalamus",
            d / "in" / "hypothalamus.nii.gz",
            "--out",
            d / "out",
            "--spacing",
            "2.5",
            "--k",
            "4,6",
            "--scheduler",
            "threads",
        ]
        p = subprocess.Popen(
            [sys.executable, "-m", "helm_dask.cli", *map(str, args)],
            cwd=d,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for line in p.stdout:
            if "background: computing" in line:
                time.sleep(0.3)
                os.killpg(p.pid, signum)
                break
        out, err = p.communicate(timeout=300)
        assert p.returncode in (code, 0), err  # 0: the run won the race and finished first
        assert "Traceback" not in out + err
        if p.returncode == code:
            assert len(_error_lines(err)) == 1, err
        assert_only_complete(d / "out")
        if resume:
            _check_resumed(p.returncode)(d, world, p)

    return check


def _check_workers_stopped(d, world, res):
    # the LocalCluster's worker processes ignore the terminal's SIGINT and are shut down by the command
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(res.pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted command are still running")
    assert "KeyboardInterrupt" not in res.stderr and "AllExit" not in res.stderr


def _check_manifest_keys(d, world, res):
    from dataclasses import fields

    from helm_dask.batch import OPTION_TO_FIELD, manifest_keys
    from helm_dask.pipeline import RunParams

    # every run option is a manifest key and maps onto a RunParams field (one list, derived from the parser)
    names = {f.name for f in fields(RunParams)}
    for dest in manifest_keys():
        assert OPTION_TO_FIELD.get(dest, (dest,))[0] in names, dest
    assert "out" not in manifest_keys() and "verify_inputs" in manifest_keys()
    assert "known keys:" in res.stderr and "spacing" in res.stderr


def _check_hint_is_a_flag(flag, not_python):
    def check(d, world, res):
        assert flag in res.stderr and not_python not in res.stderr, res.stderr

    return check


def _check_readme_and_help(d, world, res):
    from helm_dask.cli import EXIT_CODES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code, _ in EXIT_CODES:
        assert f"| {code} |" in readme, code
        assert f"  {code} " in res.stdout, code
    assert "## Failure and recovery" in readme and "HELM_DASK_FAULT" in readme


S = "{in}/scan.nii.gz"
H = "{in}/hypothalamus.nii.gz"
R = ["run", S, "--hypothalamus", H, "--out", "{out}"]

CASES = [
    # -- run: inputs
    Case(
        "run-missing-scan", ["run", "{in}/nope.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN], 2, "nope.nii.gz"
    ),
    Case("run-no-hypothalamus-flag", ["run", S, "--out", "{out}", *RUN], 2, "--hypothalamus"),
    Case("run-no-out", ["run", S, "--hypothalamus", H, *RUN], 2, "--out"),
    Case(
        "run-missing-hypothalamus",
        ["run", S, "--hypothalamus", "{in}/nohyp.nii.gz", "--out", "{out}", *RUN],
        2,
        "nohyp.nii.gz",
    ),
    Case("run-scan-not-nifti", ["run", "{in}/notes.txt", "--hypothalamus", H, "--out", "{out}", *RUN], 2, "notes.txt"),
    Case(
        "run-scan-garbage",
        ["run", "{in}/garbage.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN],
        2,
        "garbage.nii.gz",
    ),
    Case(
        "run-scan-truncated",
        ["run", "{in}/truncated.nii", "--hypothalamus", H, "--out", "{out}", *RUN],
        2,
        "truncated.nii",
    ),
    Case(
        "run-scan-2d",
        ["run", "{in}/flat2d.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN],
        2,
        "flat2d.nii.gz: the scan is a 2-D image (shape (10, 12))",
    ),
    Case(
        "run-scan-single-slice",
        ["run", "{in}/slice.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN],
        2,
        "slice.nii.gz: the scan is a single slice",
    ),
    Case("run-scan-5d", ["run", "{in}/five_d.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN], 2, "five_d.nii.gz"),
    Case(
        "run-scan-nan",
        ["run", "{in}/nan_scan.nii.gz", "--hypothalamus", H, "--out", "{out}", *RUN],
        2,
        "nan_scan.nii.gz",
    ),
    Case(
        "run-labels-other-grid",
        ["run", S, "--hypothalamus", "{in}/hyp_moved.nii.gz", "--out", "{out}", *RUN],
        2,
        "hyp_moved.nii.gz",
        clean=False,
    ),
    Case(
        "run-labels-unknown-codes",
        ["run", S, "--hypothalamus", "{in}/hyp_codes.nii.gz", "--out", "{out}", *RUN],
        2,
        "hyp_codes.nii.gz",
        clean=False,
    ),
    Case("run-scan-is-a-folder", ["run", "{in}", "--hypothalamus", H, "--out", "{out}", *RUN], 2, "in"),
    Case("run-mask-missing", [*R, "--mask", "{in}/nomask.nii.gz", *RUN], 2, "nomask.nii.gz"),
    Case("run-reference-tissue-missing", [*R, "--reference-tissue", "{in}/noref.nii.gz", *RUN], 2, "noref.nii.gz"),
    Case("run-storage-options-not-json", [*R, "--storage-options", "{nope", *RUN], 2, "--storage-options"),
    Case("run-fluid-bad-choice", [*R, "--fluid", "purple", *RUN], 2, "--fluid"),
    Case("run-label-table-missing", [*R, "--label-table", "{in}/nolut.txt", *RUN], 2, "nolut.txt", clean=False),
    # -- run: subject names (item 2)
    Case("run-subject-traversal", [*R, "--subject", "../escaped", *RUN], 2, "--subject"),
    Case("run-subject-absolute", [*R, "--subject", "/tmp/helm-escaped", *RUN], 2, "--subject"),
    Case("run-subject-separator", [*R, "--subject", "a/b", *RUN], 2, "--subject"),
    Case("run-subject-hidden", [*R, "--subject", ".hidden", *RUN], 2, "--subject"),
    Case("run-subject-dotdot", [*R, "--subject", "..", *RUN], 2, "--subject"),
    # -- run: compute and numeric options, validated at parse time (item 6)
    Case("run-workers-negative", [*R, "--workers", "-1"], 2, "--workers"),
    Case("run-workers-zero", [*R, "--workers", "0"], 2, "--workers"),
    Case("run-threads-zero", [*R, "--threads-per-worker", "0"], 2, "--threads-per-worker"),
    Case("run-memory-not-a-size", [*R, "--memory-limit", "abc"], 2, "--memory-limit"),
    Case("run-memory-below-minimum", [*R, "--memory-limit", "60MB"], 2, "--memory-limit"),
    Case("run-spacing-inf", [*R, "--spacing", "inf"], 2, "--spacing"),
    Case("run-spacing-nan", [*R, "--spacing", "nan"], 2, "--spacing"),
    Case("run-spacing-negative", [*R, "--spacing", "-1"], 2, "--spacing"),
    Case("run-closing-radius-inf", [*R, "--closing-radius-mm", "inf"], 2, "--closing-radius-mm"),
    Case("run-margin-negative", [*R, "--margin-mm", "-3"], 2, "--margin-mm"),
    Case("run-seed-negative", [*R, "--seed", "-1"], 2, "--seed"),
    Case("run-echo-negative", [*R, "--echo", "-2"], 2, "--echo"),
    Case("run-k-out-of-range", [*R, "--k", "1-3", "--scheduler", "threads"], 2, "--k"),
    Case("run-chunks-zero", [*R, "--chunks", "0"], 2, "--chunks"),
    # -- run: the output location (item 3)
    Case("run-out-under-a-file", ["run", S, "--hypothalamus", H, "--out", "{in}/afile/out", *RUN], 3, "afile"),
    Case("run-out-is-a-file", ["run", S, "--hypothalamus", H, "--out", "{in}/afile", *RUN], 3, "afile"),
    Case("run-read-only-fs", [*R, *RUN], 3, "Read-only file system", env={"HELM_DASK_FAULT": "EROFS@mkdir:*"}),
    Case("run-no-permission", [*R, *RUN], 3, "Permission denied", env={"HELM_DASK_FAULT": "EACCES@mkdir:*"}),
    Case(
        "run-disk-full-import",
        [*R, *RUN],
        3,
        "helm.zarr/scan_raw: cannot write this output (No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:scan_raw"},
    ),
    Case(
        "run-disk-full-kmeans",
        [*R, *RUN],
        3,
        "helm.zarr/kmeans_k4: cannot write this output (No space left",
        clean=False,
        env={"HELM_DASK_FAULT": "ENOSPC@write:kmeans_k4"},
        setup=_from_baseline(*KMEANS),
        slow=True,
    ),
    Case(
        "run-disk-full-nifti",
        [*R, *RUN],
        3,
        "label_map_k6.nii.gz: cannot write this output (No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:label_map_k6.nii.gz"},
        setup=_from_baseline("label_map_k6.nii.gz"),
    ),
    Case(
        "run-disk-full-json",
        [*R, *RUN],
        3,
        "run.json: cannot write this output (No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:run.json"},
        setup=_from_baseline("run.json"),
    ),
    Case(
        "run-disk-full-workers",
        [*R, "--spacing", "2.5", "--k", "4,6", "--workers", "1", "--quiet"],
        3,
        "helm.zarr/mask_ras: cannot write this output (No space left",
        clean=False,
        env={"HELM_DASK_FAULT": "ENOSPC@write:mask_ras"},
        slow=True,
    ),
    # -- run: interrupts, kills, concurrency, resume (items 4 and 7)
    Case(
        "run-ctrl-c-mid-stage-then-resume",
        [*R, *RUN],
        130,
        "interrupted",
        clean=False,
        env={"HELM_DASK_FAULT": "interrupt@write:kmeans_k4"},
        setup=_from_baseline(*KMEANS),
        check=_check_resumed(130),
        slow=True,
    ),
    Case(
        "run-ctrl-c-during-export",
        [*R, *RUN],
        130,
        "interrupted",
        clean=False,
        env={"HELM_DASK_FAULT": "interrupt@write:label_map_k6.nii.gz"},
        setup=_from_baseline(*MIRROR),
    ),
    Case(
        "run-ctrl-c-with-workers",
        [*R, "--spacing", "2.5", "--k", "4,6", "--workers", "2", "--quiet"],
        130,
        "interrupted",
        clean=False,
        env={"HELM_DASK_FAULT": "interrupt@write:preprocessed"},
        check=_check_workers_stopped,
        slow=True,
    ),
    Case(
        "run-kill-9-mid-stage-then-resume",
        [*R, *RUN],
        -9,
        None,
        clean=False,
        env={"HELM_DASK_FAULT": "kill@write:label_map_k4"},
        setup=_from_baseline(*MIRROR),
        check=_check_resumed(-9),
        killed=True,
        slow=True,
    ),
    Case(
        "run-sigint-from-outside-then-resume",
        ["--version"],
        0,
        None,
        check=_check_external_interrupt(signal.SIGINT, 130),
        slow=True,
    ),
    Case(
        "run-sigterm-from-outside",
        ["--version"],
        0,
        None,
        check=_check_external_interrupt(signal.SIGTERM, 143, resume=False),
        slow=True,
    ),
    Case("run-two-concurrent-runs", ["--version"], 0, None, check=_check_concurrent, slow=True),
    Case("run-verify-inputs", ["--version"], 0, None, check=_check_verify_inputs, slow=True),
    # -- manifests (items 1, 2 and 7)
    Case(
        "manifest-duplicate-default-names",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "m.yaml: two or more subjects would write to the same folder: rows 1, 2",
        setup=_two_scans_same_name,
    ),
    Case(
        "manifest-duplicate-subjects",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "subject:",
        setup=_manifest(f"subjects:\n  - {ROW}, subject: a}}\n  - {ROW}, subject: b}}\n  - {ROW}, subject: a}}\n"),
    ),
    Case(
        "manifest-duplicate-names-differing-in-case",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "rows 1, 2",
        setup=_manifest(f"subjects:\n  - {ROW}, subject: Sub01}}\n  - {ROW}, subject: sub01}}\n"),
    ),
    Case(
        "manifest-subject-traversal",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "m.yaml: subject 1",
        setup=_manifest(f"subjects:\n  - {ROW}, subject: ../../escaped}}\n"),
    ),
    Case(
        "manifest-subject-absolute",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "m.yaml: subject 1",
        setup=_manifest(f"subjects:\n  - {ROW}, subject: /tmp/helm-escaped}}\n"),
    ),
    Case(
        "manifest-out-key",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'out' is not a manifest key",
        setup=_manifest(f"subjects:\n  - {ROW}, out: /tmp/helm-escaped}}\n"),
    ),
    Case(
        "manifest-unknown-key",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "unknown key 'alfa'",
        setup=_manifest(f"subjects:\n  - {ROW}, alfa: 0.001}}\n"),
        check=_check_manifest_keys,
    ),
    Case(
        "manifest-unknown-params-key",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "params: unknown key",
        setup=_manifest(f"params: {{spacingg: 2}}\nsubjects:\n  - {ROW}}}\n"),
    ),
    Case(
        "manifest-unknown-top-level-key",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'subject'",
        setup=_manifest(f"subject:\n  - {ROW}}}\nsubjects: []\n"),
    ),
    Case(
        "manifest-bad-value",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'spacing'",
        setup=_manifest(f"params: {{spacing: inf}}\nsubjects:\n  - {ROW}}}\n"),
    ),
    Case(
        "manifest-bad-choice",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'side'",
        setup=_manifest(f"subjects:\n  - {ROW}, side: up}}\n"),
    ),
    Case(
        "manifest-bad-switch",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'no_qc'",
        setup=_manifest(f"subjects:\n  - {ROW}, no_qc: maybe}}\n"),
    ),
    Case(
        "manifest-subject-in-params",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'subject'",
        setup=_manifest(f"params: {{subject: all}}\nsubjects:\n  - {ROW}}}\n"),
    ),
    Case(
        "manifest-invalid-yaml",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "m.yaml: is not valid YAML",
        setup=_manifest("subjects: [ {scan: \n"),
    ),
    Case(
        "manifest-no-subjects",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "m.yaml: has no 'subjects:'",
        setup=_manifest("params: {k: 4}\n"),
    ),
    Case(
        "manifest-row-not-a-mapping",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "subject 1",
        setup=_manifest("subjects:\n  - scan.nii.gz\n"),
    ),
    Case(
        "manifest-row-without-hypothalamus",
        ["run", "{in}/m.yaml", "--out", "{out}", *RUN],
        2,
        "'hypothalamus'",
        setup=_manifest("subjects:\n  - {scan: scan.nii.gz}\n"),
    ),
    Case("manifest-not-found", ["run", "{in}/nope.yaml", "--out", "{out}", *RUN], 2, "nope.yaml"),
    Case(
        "manifest-csv-unknown-column",
        ["run", "{in}/m.csv", "--out", "{out}", *RUN],
        2,
        "unknown key 'weight'",
        setup=_manifest("scan,hypothalamus,weight\nscan.nii.gz,hypothalamus.nii.gz,3\n", "m.csv"),
    ),
    Case(
        "manifest-csv-extra-cells",
        ["run", "{in}/m.csv", "--out", "{out}", *RUN],
        2,
        "m.csv: subject 1",
        setup=_manifest("scan,hypothalamus\nscan.nii.gz,hypothalamus.nii.gz,extra\n", "m.csv"),
    ),
    Case(
        "manifest-with-subject-flag",
        ["run", "{in}/m.yaml", "--subject", "x", "--out", "{out}", *RUN],
        2,
        "--subject",
        setup=_manifest(f"subjects:\n  - {ROW}}}\n"),
    ),
    Case(
        "manifest-with-mask-flag",
        ["run", "{in}/m.yaml", "--mask", H, "--out", "{out}", *RUN],
        2,
        "--mask",
        setup=_manifest(f"subjects:\n  - {ROW}}}\n"),
    ),
    Case(
        "manifest-a-broken-subject",
        ["run", "{in}/m.yaml", "--out", "{out}", "--until", "preprocess", "--no-qc", *RUN],
        4,
        "[broken] failed: ",
        clean=False,
        setup=_manifest(
            f"subjects:\n  - {ROW}, subject: good}}\n"
            "  - {scan: garbage.nii.gz, hypothalamus: hypothalamus.nii.gz, subject: broken}\n"
        ),
        slow=True,
    ),
    # -- convert
    Case(
        "convert-missing", ["convert", "{in}/nope.nii.gz", "{out}/o.zarr", "--scheduler", "threads"], 2, "nope.nii.gz"
    ),
    Case(
        "convert-2d",
        ["convert", "{in}/flat2d.nii.gz", "{out}/o.zarr", "--scheduler", "threads"],
        2,
        "flat2d.nii.gz: is a 2-D image (shape (10, 12))",
    ),
    Case("convert-5d", ["convert", "{in}/five_d.nii.gz", "{out}/o.zarr", "--scheduler", "threads"], 2, "five_d.nii.gz"),
    Case(
        "convert-nan",
        ["convert", "{in}/nan_scan.nii.gz", "{out}/o.zarr", "--scheduler", "threads"],
        2,
        "nan_scan.nii.gz",
    ),
    Case(
        "convert-exists",
        ["convert", S, "{out}/o.zarr", "--scheduler", "threads"],
        3,
        "o.zarr: already exists",
        setup=_existing_out,
    ),
    Case("convert-out-under-a-file", ["convert", S, "{in}/afile/o.zarr", "--scheduler", "threads"], 3, "afile"),
    Case(
        "convert-disk-full",
        ["convert", S, "{out}/o.zarr", "--scheduler", "threads"],
        3,
        "o.zarr: cannot write this output (No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:o.zarr"},
    ),
    Case(
        "convert-disk-full-nifti",
        ["convert", "{in}/hyp.zarr", "{out}/h.nii.gz", "--scheduler", "threads"],
        3,
        "h.nii.gz: cannot write this output (No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:h.nii.gz"},
        setup=_zarr_input,
    ),
    Case("convert-no-direction", ["convert", S, "{out}/o.txt", "--scheduler", "threads"], 2, "direction"),
    Case("convert-chunks-zero", ["convert", S, "{out}/o.zarr", "--chunks", "0"], 2, "--chunks"),
    Case("convert-echo-of-3d", ["convert", S, "{out}/o.zarr", "--echo", "2", "--scheduler", "threads"], 2, "--echo"),
    Case("convert-workers-zero", ["convert", S, "{out}/o.zarr", "--workers", "0"], 2, "--workers"),
    # -- info
    Case("info-missing", ["info", "{in}/nope.nii.gz"], 2, "nope.nii.gz"),
    Case("info-garbage", ["info", "{in}/garbage.nii.gz"], 2, "garbage.nii.gz"),
    Case("info-truncated", ["info", "{in}/truncated.nii"], 2, "truncated.nii"),
    Case("info-not-an-image", ["info", "{in}/notes.txt"], 2, "notes.txt"),
    Case("info-unfinished-store", ["info", "{in}/hyp.zarr"], 2, "hyp.zarr: is an unfinished", setup=_unfinished_store),
    # -- compare
    Case("compare-missing", ["compare", "{in}/nope.nii.gz", H, "--scheduler", "threads"], 2, "nope.nii.gz"),
    Case(
        "compare-not-labels",
        ["compare", "{in}/floats.nii.gz", H, "--scheduler", "threads"],
        2,
        "floats.nii.gz",
        check=_check_hint_is_a_flag("hemi_k6", ".astype"),
    ),
    Case(
        "compare-other-grid",
        ["compare", "{in}/hyp_moved.nii.gz", H, "--scheduler", "threads"],
        2,
        "hyp_moved.nii.gz",
        check=_check_hint_is_a_flag("--resample", "resample_b"),
    ),
    Case(
        "compare-label-zero",
        ["compare", H, H, "--labels", "0,801", "--scheduler", "threads"],
        2,
        "--labels",
        check=_check_hint_is_a_flag("--labels", "Leave 0 out of labels."),
    ),
    Case("compare-2d", ["compare", "{in}/flat2d.nii.gz", H, "--scheduler", "threads"], 2, "flat2d.nii.gz"),
    Case(
        "compare-csv-under-a-file", ["compare", H, H, "--csv", "{in}/afile/x.csv", "--scheduler", "threads"], 3, "afile"
    ),
    # -- synth
    Case(
        "synth-missing",
        ["synth", "{in}/nope.nii.gz", "--out", "{out}", "--n", "1", "--scheduler", "threads"],
        2,
        "nope.nii.gz",
    ),
    Case(
        "synth-2d",
        ["synth", "{in}/flat2d.nii.gz", "--out", "{out}", "--n", "1", "--scheduler", "threads"],
        2,
        "flat2d.nii.gz",
    ),
    Case("synth-spacing-inf", ["synth", H, "--out", "{out}", "--spacing", "inf"], 2, "--spacing"),
    Case("synth-n-negative", ["synth", H, "--out", "{out}", "--n", "-1", "--scheduler", "threads"], 2, "--n"),
    Case(
        "synth-out-under-a-file",
        ["synth", H, "--out", "{in}/afile/s", "--n", "1", "--scheduler", "threads"],
        3,
        "afile",
    ),
    # -- phantom
    Case("phantom-spacing-inf", ["phantom", "{out}/p", "--spacing", "inf"], 2, "--spacing"),
    Case("phantom-spacing-zero", ["phantom", "{out}/p", "--spacing", "0"], 2, "--spacing"),
    Case(
        "phantom-out-under-a-file", ["phantom", "{in}/afile/p", "--spacing", "6", "--scheduler", "threads"], 3, "afile"
    ),
    Case(
        "phantom-exists",
        ["phantom", "{out}", "--spacing", "6", "--scheduler", "threads"],
        3,
        "scan.nii.gz: already exists",
        setup=_existing_out,
    ),
    Case("phantom-option-of-the-other-anatomy", ["phantom", "{out}/p", "--bag-gap-mm", "3"], 2, "--bag-gap-mm"),
    Case(
        "phantom-bag-gap-negative",
        ["phantom", "{out}/p", "--anatomy", "mni152", "--bag-gap-mm", "-2", "--scheduler", "threads"],
        2,
        "--bag-gap-mm",
    ),
    Case(
        "phantom-disk-full",
        ["phantom", "{out}/p.zarr", "--spacing", "6", "--scheduler", "threads"],
        3,
        "No space left",
        env={"HELM_DASK_FAULT": "ENOSPC@write:scan"},
    ),
    # -- exit codes documented (item 7)
    Case("help-lists-exit-codes", ["--help"], 0, None, check=_check_readme_and_help),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.e2e
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys):
    d = tmp_path
    (d / "in").mkdir()
    _copy_inputs(world, d / "in")
    if case.setup:
        case.setup(d, world)
    out = d / "out"
    before_out, before_in = _tree(out), _hashes(d / "in")
    args = [str(a).replace("{in}", str(d / "in")).replace("{out}", str(out)) for a in case.args]
    if not case.env and not case.check and case.code in (2, 3):
        # a plain error: main() in this process (an interpreter start saved); the rest runs the real command
        from helm_dask.cli import main

        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code
        cap = capsys.readouterr()
        res = subprocess.CompletedProcess(args, code, cap.out, cap.err)
    else:
        p = subprocess.Popen(
            [sys.executable, "-m", "helm_dask.cli", *args],
            cwd=d,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_env(case.env),
        )
        out_text, err_text = p.communicate(timeout=300)
        res = subprocess.CompletedProcess(p.args, p.returncode, out_text, err_text)
        res.pgid = p.pid
    stdout, stderr = res.stdout, res.stderr
    assert res.returncode == case.code, f"exit {res.returncode}, expected {case.code}\n{stderr}"
    assert "Traceback" not in stdout + stderr, stderr
    lines = _error_lines(stderr)
    if case.needle is None:
        assert not lines, stderr
    else:
        assert len(lines) == 1, stderr
        assert lines[0].startswith("helm-dask"), lines[0]
        assert case.needle in lines[0], (case.needle, lines[0])
    if case.clean:
        assert _tree(out) == before_out, sorted(_tree(out) - before_out)
    if not case.killed:
        assert_only_complete(out)
    if case.check:
        case.check(d, world, res)
    if case.id != "run-verify-inputs":  # that one replaces an input on purpose
        assert _hashes(d / "in") == before_in
