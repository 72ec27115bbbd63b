"""Check that a refactor changed no output: run fixed phantom cases with two code trees and compare every file.

    python bench/identical.py run  --code DIR --out RUNS   # one tree's outputs (PYTHONPATH=DIR)
    python bench/identical.py diff RUNS_A RUNS_B           # exit 1 on any difference

Cases: the geometric phantom at 0.5 mm (bright fixative, native spacing), the template phantom at 1.0 mm with a dark
fixative, a tilted header and a right hemisphere (working spacing 0.5 mm), and the geometric phantom at 0.5 mm with
the helm layout and the minibatch k-means. Arrays (every NIfTI and every Zarr array) must be bit-identical, NIfTI
headers byte-identical; JSON files must be equal once timings, stage keys, versions, paths and host facts are
dropped; QC pictures and HTML may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CASES = {
    "geo05": (["--spacing", "0.5"], ["--spacing", "native"]),
    "mni10": (
        ["--spacing", "1.0", "--anatomy", "mni152", "--fluid", "dark", "--side", "R", "--header-rotation-deg", "12"],
        ["--spacing", "0.5"],
    ),
    "geo05helm": (
        ["--spacing", "0.5", "--seed", "3"],
        ["--spacing", "native", "--layout", "helm", "--kmeans-method", "minibatch", "--k", "4,6"],
    ),
}

# JSON keys whose values legitimately change between two runs of the same code or between code versions.
VOLATILE = {
    "stage_key",
    "seconds",
    "wall_s",
    "elapsed_s",
    "started",
    "finished",
    "date",
    "time",
    "timings",
    "key",
    "keys",
    "version",
    "versions",
    "stage_versions",
    "helm_dask_version",
    "commit",
    "host",
    "hostname",
    "python",
    "platform",
    "cluster",
    "dashboard",
    "out",
    "path",
    "paths",
    "scan",
    "hypothalamus",
    "inputs",
    "command",
    "argv",
    "peak_rss_mb",
    "stage_seconds",
    "packages",
    "created",
    "workers",
    "memory_limit",
}


def run(code: Path, out: Path, cases: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(code))
    cli = [sys.executable, "-m", "helm_dask.cli"]
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # `python -m` puts the working directory first on the import path: started in a checkout, the children would
    # import that checkout's helm_dask and ignore --code. They run in the output folder instead, and check it.
    where = subprocess.run(
        [sys.executable, "-c", "import helm_dask, os; print(os.path.dirname(helm_dask.__file__))"],
        env=env,
        cwd=out,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if Path(where).resolve() != (Path(code) / "helm_dask").resolve():
        raise SystemExit(f"--code {code}: the children would import helm_dask from {where}")
    for name in cases:
        ph_args, run_args = CASES[name]
        src = out / f"{name}_input"
        shutil.rmtree(out / name, ignore_errors=True)
        if not (src / "scan.nii.gz").exists():
            subprocess.run([*cli, "phantom", str(src), "--quiet", *ph_args], env=env, cwd=out, check=True)
        subprocess.run(
            [
                *cli,
                "run",
                str(src / "scan.nii.gz"),
                "--hypothalamus",
                str(src / "hypothalamus.nii.gz"),
                "--out",
                str(out / name),
                "--subject",
                "s",
                "--quiet",
                *run_args,
                "--workers",
                "2",
            ],
            env=env,
            cwd=out,
            check=True,
        )


# QC facts (label, text) that hold timings or the report's date.
VOLATILE_FACTS = {"Stage times", "Report"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj if not (isinstance(v, list) and v and str(v[0]) in VOLATILE_FACTS)]
    return obj


def _zarr_arrays(root: Path):
    import zarr

    for meta in sorted(root.rglob("zarr.json")):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            yield meta.parent.relative_to(root), zarr.open_array(meta.parent, mode="r")


def diff(a: Path, b: Path) -> int:
    import nibabel as nib

    bad, checked = [], 0
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    interesting = lambda p: p.suffix in {".json", ".gz", ".nii"} and "zarr" not in str(p)
    for p in sorted({p for p in files_a ^ files_b if interesting(p)}):
        bad.append(f"{p}: only in {'A' if p in files_a else 'B'}")
    for p in sorted(files_a & files_b):
        if ".zarr" in str(p) or not interesting(p) or "_input" in str(p).split("/")[0]:
            continue
        fa, fb = a / p, b / p
        if p.suffix == ".json":
            ja, jb = _strip(json.loads(fa.read_text())), _strip(json.loads(fb.read_text()))
            if ja != jb:
                bad.append(f"{p}: JSON differs: {json.dumps(ja)[:300]} vs {json.dumps(jb)[:300]}")
        else:
            ia, ib = nib.load(fa), nib.load(fb)
            if ia.header.binaryblock != ib.header.binaryblock:
                bad.append(f"{p}: NIfTI header differs")
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            if da.dtype != db.dtype or da.shape != db.shape or not np.array_equal(da, db, equal_nan=True):
                bad.append(f"{p}: NIfTI data differs")
        checked += 1
    stores_a = sorted(p for p in a.rglob("*.zarr") if p.is_dir() and "_input" not in str(p.relative_to(a)))
    for sa in stores_a:
        sb = b / sa.relative_to(a)
        arrays_a = dict(_zarr_arrays(sa))
        arrays_b = dict(_zarr_arrays(sb)) if sb.exists() else {}
        for name in sorted(set(arrays_a) ^ set(arrays_b)):
            bad.append(f"{sa.relative_to(a)}/{name}: array only in {'A' if name in arrays_a else 'B'}")
        for name in sorted(set(arrays_a) & set(arrays_b)):
            za, zb = arrays_a[name], arrays_b[name]
            where = f"{sa.relative_to(a)}/{name}"
            if za.shape != zb.shape or za.dtype != zb.dtype or za.chunks != zb.chunks:
                bad.append(f"{where}: shape/dtype/chunks differ")
                continue
            va, vb = za[...], zb[...]
            if not np.array_equal(va, vb, equal_nan=True):
                bad.append(f"{where}: values differ ({int(np.sum(va != vb))} voxels)")
            if _strip(dict(za.attrs)) != _strip(dict(zb.attrs)):
                bad.append(f"{where}: attrs differ")
            checked += 1
    for line in bad:
        print("DIFF", line)
    print(f"{checked} files and arrays compared, {len(bad)} differences")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--code", type=Path, required=True, help="the source tree to run (its helm_dask/ package)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    d = sub.add_parser("diff")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.code.resolve(), args.out, args.case or sorted(CASES))
        return 0
    return diff(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
