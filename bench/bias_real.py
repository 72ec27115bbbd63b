"""Bias on real anatomy: our DCT-mixture fit next to SimpleITK's N4 on the template phantom (issue 17, item 4).

    python bench/bias_real.py [--spacing 1.0 0.5] [--fluids bright,dark,none] [--bag-gap-mm 5] [--seed 0]
                              [--ours basis_spacing_mm=50,n_classes=4] [--no-n4] [--no-record]

For every spacing and fluid the template phantom (:func:`helm_dask.phantom_mni.phantom_mni`) is computed once in
memory (scan, true brain mask, true tissue classes, true bias field), then

* **ours**: ``estimate_bias(masked scan, true mask)`` exactly as the pipeline calls it (defaults, or the options
  given with ``--ours``), the field evaluated with ``bias_field(model, image)`` on the full grid;
* **N4**: ``sitk.N4BiasFieldCorrectionImageFilter`` with its defaults and ``SetMaximumNumberOfIterations([50] * 4)``
  on a shrink of the same masked image and the true mask (shrink factor ``round(2 mm / spacing)``), the log field
  from ``GetLogBiasFieldAsImage(full-resolution image)``.

The true mask isolates the bias method from the brain-mask stage. Scores, inside the true mask: the Pearson
correlation of the estimated and true log-fields (the field is identifiable only up to a constant factor), and the
coefficient of variation (std / mean) of grey matter (``truth_tissue == 2``) and white matter (``== 3``) before and
after dividing by the estimated field. The correction by the *true* field is printed as the floor (partial
volume, texture and noise remain).

One row per method, fluid and spacing goes to bench/results/results.csv (stage ``bias-real:<method>:<fluid>``,
scores in the note; the wall time is the fit plus the full-grid field; the peak RSS column is left empty because
the truth arrays are held in memory for scoring). A markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from harness import append_row, measured

N4_TARGET_MM = 2.0  # N4 runs on a shrink of the image to about this spacing
N4_ITERATIONS = [50] * 4  # 4 fitting levels x 50 iterations; everything else is SimpleITK's default


def phantom_arrays(spacing_mm: float, fluid: str, *, bag_gap_mm: float = 5.0, seed: int = 0) -> dict:
    """The template phantom's scan, masked scan, truths (NumPy) and the volumes wrapping them (dask, same chunks)."""
    import dask
    import dask.array as da

    from helm_dask.phantom_mni import phantom_mni
    from helm_dask.volume import affine_of, make_volume

    v = phantom_mni(spacing_mm, fluid=fluid, bag_gap_mm=bag_gap_mm, seed=seed)
    names = ("scan", "truth_mask", "truth_tissue", "truth_bias")
    scan, mask, tissue, bias = dask.compute(*[v[k].data for k in names])
    aff = affine_of(v["scan"])
    chunks = v["scan"].data.chunks
    masked = np.where(mask > 0, scan, np.float32(0)).astype(np.float32)
    return {
        "scan": scan,
        "masked": masked,
        "mask": mask,
        "tissue": tissue,
        "bias": bias,
        "affine": aff,
        "masked_vol": make_volume(da.from_array(masked, chunks=chunks), aff, kind="image", name="masked"),
        "mask_vol": make_volume(da.from_array(mask, chunks=chunks), aff, kind="mask", name="mask"),
        "spacing_mm": float(spacing_mm),
        "fluid": fluid,
        "bag_gap_mm": float(bag_gap_mm),
        "seed": int(seed),
    }


def ours_log_field(p: dict, **options) -> tuple[np.ndarray, dict]:
    """Our estimate as the pipeline runs it: (log-field on the full grid, model info)."""
    from helm_dask.bias import bias_field, estimate_bias

    model = estimate_bias(p["masked_vol"], p["mask_vol"], **options)
    fld = bias_field(model, p["masked_vol"]).values
    return np.log(fld.astype(np.float64)), dict(model.info)


def n4_log_field(p: dict) -> tuple[np.ndarray, dict]:
    """SimpleITK N4 (defaults, 4 x 50 iterations) on a ~2 mm shrink with the true mask; log-field on the full grid.

    The arrays go to SimpleITK as they are (its index order is the reverse of NumPy's, and so is the array it
    returns); the spacing is isotropic, so only the spacing matters to the fit.
    """
    import SimpleITK as sitk

    s = p["spacing_mm"]
    f = max(1, int(round(N4_TARGET_MM / s)))
    img = sitk.GetImageFromArray(p["masked"].astype(np.float32))
    img.SetSpacing((s, s, s))
    msk = sitk.GetImageFromArray((p["mask"] > 0).astype(np.uint8))
    msk.SetSpacing((s, s, s))
    small, small_mask = sitk.Shrink(img, [f] * 3), sitk.Shrink(msk, [f] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(N4_ITERATIONS)
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).astype(np.float64)
    info = {
        "shrink": f,
        "elapsed_iterations_last_level": int(n4.GetElapsedIterations()),
        "convergence": float(n4.GetCurrentConvergenceMeasurement()),
        "control_points": list(n4.GetNumberOfControlPoints()),
    }
    return log_field, info


def scores(p: dict, log_field: np.ndarray) -> dict:
    """Correlation of log-fields and GM/WM coefficients of variation before/after, inside the true mask."""
    inside = p["mask"] > 0
    true_log = np.log(p["bias"][inside].astype(np.float64))
    r = float(np.corrcoef(log_field[inside], true_log)[0, 1])
    scan = p["scan"].astype(np.float64)
    out = {"r": r}
    for name, code in (("gm", 2), ("wm", 3)):
        sel = inside & (p["tissue"] == code)
        before = scan[sel]
        after = before / np.exp(log_field[sel])
        out[f"cv_{name}_before"] = float(before.std() / before.mean())
        out[f"cv_{name}_after"] = float(after.std() / after.mean())
    return out


def _phantom_version() -> str:
    from helm_dask import phantom_mni

    src = Path(phantom_mni.__file__).read_bytes()
    return f"phantom_mni v{phantom_mni.MNI_MODEL_VERSION} ({hashlib.sha256(src).hexdigest()[:8]})"


def _parse_options(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        k, v = item.split("=", 1)
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spacing", type=float, nargs="+", default=[1.0])
    ap.add_argument("--fluids", default="bright,dark,none")
    ap.add_argument("--bag-gap-mm", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default="", help="estimate_bias options, e.g. basis_spacing_mm=50,n_classes=4")
    ap.add_argument("--label", default="", help="suffix of our method's name in the table and the stage")
    ap.add_argument("--no-n4", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="print only, append no rows")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    options = _parse_options(args.ours)
    ours_name = "ours" + (f"-{args.label}" if args.label else "")
    version = _phantom_version()
    table = []
    for s in args.spacing:
        for fluid in args.fluids.split(","):
            t0 = time.perf_counter()
            p = phantom_arrays(s, fluid, bag_gap_mm=args.bag_gap_mm, seed=args.seed)
            gen = time.perf_counter() - t0
            floor = scores(p, np.log(p["bias"].astype(np.float64)))
            runs = [(ours_name, lambda p=p: ours_log_field(p, **options))]
            if not args.no_n4:
                runs.append(("n4", lambda p=p: n4_log_field(p)))
            for name, run in runs:
                with measured() as m:
                    log_field, info = run()
                sc = scores(p, log_field)
                if name.startswith("ours"):
                    detail = (
                        f"basis {info['basis_functions']} ({info['basis_spacing_mm']:g} mm), "
                        f"{info['n_classes']} classes, {info['n_iter']} EM iterations"
                        + (f", options {args.ours}" if args.ours else "")
                    )
                else:
                    detail = (
                        f"shrink {info['shrink']}, defaults + 4 x 50 iterations, "
                        f"{info['elapsed_iterations_last_level']} iterations at the last level"
                    )
                note = "; ".join(
                    x
                    for x in (
                        args.note,
                        f"fluid {fluid}, bag gap {args.bag_gap_mm:g} mm, seed {args.seed}, true mask",
                        f"r(log field) {sc['r']:.3f}",
                        *(
                            f"CV {t.upper()} {sc[f'cv_{t}_before']:.3f} -> {sc[f'cv_{t}_after']:.3f} "
                            f"(true field {floor[f'cv_{t}_after']:.3f})"
                            for t in ("gm", "wm")
                        ),
                        detail,
                        f"cpu {m.sampler.cpu_seconds:.1f} s",
                        version,
                    )
                    if x
                )
                row = {
                    "stage": f"bias-real:{name}:{fluid}",
                    "spacing_mm": f"{s:g}",
                    "work_spacing_mm": "native",
                    "voxels": int(p["scan"].size),
                    "workers": 1,
                    "threads_per_worker": 2,
                    "wall_s": round(m.wall, 2),
                    "mvox_per_s": round(p["scan"].size / m.wall / 1e6, 2),
                    "load_avg": round(m.sampler.mean_load, 1),
                    "note": note,
                }
                if not args.no_record:
                    append_row(row)
                print(
                    f"{s:g} mm {fluid:6s} {name:10s} r={sc['r']:.3f} GM {sc['cv_gm_before']:.3f}->"
                    f"{sc['cv_gm_after']:.3f} WM {sc['cv_wm_before']:.3f}->{sc['cv_wm_after']:.3f} "
                    f"{m.wall:.1f} s ({detail}); phantom {gen:.1f} s",
                    flush=True,
                )
                table.append((s, fluid, name, sc, floor, m.wall))
    print()
    print(
        "| spacing mm | fluid | method | r(log field) | CV GM before -> after | CV WM before -> after | "
        "CV GM / WM, true field | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s, fluid, name, sc, floor, wall in table:
        print(
            f"| {s:g} | {fluid} | {name} | {sc['r']:.3f} | {sc['cv_gm_before']:.3f} -> {sc['cv_gm_after']:.3f} | "
            f"{sc['cv_wm_before']:.3f} -> {sc['cv_wm_after']:.3f} | {floor['cv_gm_after']:.3f} / "
            f"{floor['cv_wm_after']:.3f} | {wall:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
