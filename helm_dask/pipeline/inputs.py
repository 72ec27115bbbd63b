"""The run's inputs beyond the scan: the manual labels on the scan's grid, the user's ``--mask``, the side of the
hemisphere, and the metadata that lets a rerun recognise an unchanged input."""

from __future__ import annotations

import sys
from typing import cast

import dask.array as da
import numpy as np

from ..errors import HelmError
from ..io import location
from ..io.convert import nifti_to_zarr, read_header
from ..io.store import open_group, read_meta, set_label_colours
from ..orient import check_same_grid, check_side, detect_side, require_clear_side, to_ras
from ..resample import resample_to_grid
from ..volume import affine_of, like, make_volume, orientation_code, provenance_record, spacing_of
from .params import RunParams
from .subject import Subject


def update_meta(path: str, extra: dict, storage_options: dict | None = None) -> None:
    """Add ``extra`` to a stored volume's helm-dask metadata (its stage key, its input's stamp).

    Parameters
    ----------
    path : str
        The volume's store.
    extra : dict
        Keys to add or replace.
    storage_options : dict, optional
        fsspec options for a URL.
    """
    g = open_group(path, "r+", storage_options)
    meta = dict(cast(dict, g.attrs["helm_dask"]))
    meta.update(extra)
    g.attrs["helm_dask"] = meta


def external_mask(subj: Subject, key: str, scan_raw, scan_ras, sha: str):
    """The ``--mask`` file, checked and imported, as a lazy 0/1 uint8 mask on the RAS+ scan grid.

    Checks: 3-D and on the scan's grid (the header, before anything is streamed), finite values, not empty. The
    file is streamed into ``helm.zarr/mask_raw`` like the scan (bounded memory; kept, with the stage key, so a
    run killed during the stage does not import it again), then reoriented exactly like the scan (any non-zero
    value = brain).

    Parameters
    ----------
    subj : Subject
        The subject (``subj.p.mask`` is the file).
    key : str
        The background stage's key (kept with the imported mask, so a resumed run does not import it again).
    scan_raw, scan_ras : volume
        The imported scan, and its RAS+ view.
    sha : str
        The mask file's checksum.

    Returns
    -------
    volume
        The mask on the RAS+ scan grid, with ``attrs["background"]`` saying which file it came from.
    """
    src, so = subj.p.mask, subj.so
    fix = (
        "give a mask on the scan's voxel grid (e.g. SAMSEG's segmentation of this scan; any non-zero value is "
        "brain), or drop --mask to compute one"
    )
    if not subj.volume_ok("mask_raw", key):
        info = read_header(src, storage_options=so)
        if len(info.shape) != 3:
            raise HelmError(f"the brain mask is {len(info.shape)}-D (shape {info.shape}), not 3-D", path=src, hint=fix)
        header_only = make_volume(da.zeros(info.shape, dtype=np.uint8, chunks=info.shape), info.affine, kind="mask")
        try:
            check_same_grid(scan_raw, header_only, path=src)
        except HelmError as e:  # its message speaks of labels and its hint of --resample-labels
            raise HelmError(
                e.message.replace("the labels", "the brain mask"),
                path=src,
                hint="resample the mask onto the scan first (nearest neighbour, e.g. mri_vol2vol "
                "--regheader --interp nearest), or drop --mask to compute one",
            ) from None
        # NaN/inf are zeroed on import and counted: refused here with a message about the mask, not the scan
        out = nifti_to_zarr(
            src,
            subj.vpath("mask_raw"),
            chunks=subj.p.chunks,
            kind="labels",
            nonfinite="zero",
            pyramid=False,
            overwrite=True,
            quiet=subj.quiet,
            storage_options=so,
            ras=True,  # like the scan
        )
        if out["nonfinite"]:
            location.remove_quietly(subj.vpath("mask_raw"), so)
            raise HelmError(f"the brain mask has {out['nonfinite']:,} NaN or infinite voxels", path=src, hint=fix)
        update_meta(
            subj.vpath("mask_raw"),
            {
                "stage_key": key,
                "stage": "background",
                "input_stamp": {
                    "stamp": location.stamp(src, so),
                    "sha256": out["sha256"],
                    "path": location.absolute(src),
                },
            },
            so,
        )
    raw = subj.open("mask_raw")
    n = int(da.count_nonzero(raw.data).compute())
    if n == 0:
        raise HelmError("the brain mask is empty (every voxel is 0)", path=src, hint=fix)
    ras = to_ras(raw)
    # The grids agree within check_same_grid's tolerance (1e-4 mm); the mask takes the scan's exact affine so that
    # it sits on the scan like a computed mask would (apply_mask and the resampling compare affines exactly).
    mask = like(
        ras,
        (ras.data != 0).astype(np.uint8),
        affine=affine_of(scan_ras),
        kind="mask",
        name="brain_mask",
        step=provenance_record(
            "background", {"method": "external", "nonzero_is_brain": True}, {location.absolute(src): sha}
        ),
    )
    mask.attrs["background"] = {
        "method": "external",
        "path": location.absolute(src),
        "sha256": sha,
        "orientation_in": orientation_code(read_header(src, storage_options=so).affine),  # the file's (raw: RAS)
        "voxels": n,
        "mm3": n * float(np.prod(spacing_of(affine_of(raw)))),
    }
    return mask


def labels_on_scan_grid(labels, scan, params: RunParams):
    """The manual labels on the scan's grid: checked (``HelmError`` with a hint otherwise), or resampled onto it
    by nearest neighbour with ``--resample-labels``.

    Parameters
    ----------
    labels, scan : volume
        The imported labels and scan.
    params : RunParams
        The run's options (``resample_labels``, and the labels' path for messages).

    Returns
    -------
    volume
    """
    if params.resample_labels:
        try:
            check_same_grid(scan, labels, path=params.hypothalamus)
        except HelmError:
            return resample_to_grid(labels, scan.shape, affine_of(scan), order=0)
        return labels
    check_same_grid(scan, labels, path=params.hypothalamus)
    return labels


def decide_side(subj: Subject, given: str, mask_ras, labels_ras) -> tuple[str, dict]:
    """The hemisphere's side: ``--side`` if given (a disagreement with the data is warned about), else decided
    from where the hypothalamus lies in the mask (refused when the evidence is weak).

    Parameters
    ----------
    subj : Subject
        For the log and the labels' path.
    given : str
        ``L``, ``R`` or ``auto``.
    mask_ras, labels_ras : volume
        The brain mask and the manual labels on the RAS+ scan grid.

    Returns
    -------
    side : str
        ``L`` or ``R``.
    info : dict
        What :func:`helm_dask.orient.detect_side` measured (recorded in ``run.json``).
    """
    detected, info = detect_side(mask_ras, labels_ras)
    if given == "auto":
        # a weak decision would be a guess (orient.SIDE_MIN_STRENGTH): refuse it rather than mirror wrongly;
        # an explicit --side is trusted (a disagreement is only warned about, below)
        require_clear_side(info, path=subj.p.hypothalamus)
        subj.log(f"side: auto -> {detected} ({info.get('reason', '')})")
        return detected, info
    warn = check_side(given, info)
    if warn:
        subj.log(f"WARNING: {warn}")
        print(f"helm-dask: warning: {warn}", file=sys.stderr)
    return given, info


def import_given(subj: Subject, key: str) -> dict:
    """``--preprocessed``: stream the given image into ``helm.zarr/preprocessed`` and its labels into
    ``labels_raw`` (RAS+ voxel order, like the scan's import; what already carries ``key`` is kept).

    Parameters
    ----------
    subj : Subject
        The subject (``subj.p.scan`` is the preprocessed image, ``subj.p.hypothalamus`` its labels).
    key : str
        The key of the run's import (it stands for the stages that were given).

    Returns
    -------
    dict
        ``{"preprocessed": volume, "labels_raw": volume}``, opened lazily from the store.
    """
    p, so = subj.p, subj.so
    subj.ensure_store()
    for nm, src, kind in (("preprocessed", p.scan, "image"), ("labels_raw", p.hypothalamus, "labels")):
        if subj.volume_ok(nm, key):
            continue
        nifti_to_zarr(
            src,
            subj.vpath(nm),
            chunks=p.chunks,
            echo=p.echo,
            echo_combine=p.echo_combine if p.echo is None else None,
            kind=kind,
            nonfinite=p.nonfinite,
            overwrite=True,
            quiet=subj.quiet,
            storage_options=so,
            ras=True,  # the working orientation is RAS+: an image from a run's preprocessed.nii.gz is unchanged
        )
        sha = read_meta(subj.vpath(nm), storage_options=so)["input_sha256"]
        stamp = {"stamp": location.stamp(src, so), "sha256": sha}
        update_meta(subj.vpath(nm), {"stage_key": key, "stage": "import", "input_stamp": stamp}, so)
        if kind == "labels":
            set_label_colours(subj.vpath(nm), subj.label_colours(), storage_options=so)
    return {nm: subj.open(nm) for nm in ("preprocessed", "labels_raw")}


def given_mask(subj: Subject, key: str, image, sha: str | None):
    """``--preprocessed``: the brain mask, lazily -- the ``--mask`` file (checked and imported as
    :func:`external_mask` does) or else the image's non-zero voxels (the image is zero outside the brain).

    Parameters
    ----------
    subj : Subject
        The subject.
    key : str
        The import's key.
    image : volume
        The imported preprocessed image (RAS+).
    sha : str or None
        The ``--mask`` file's checksum (None without ``--mask``).

    Returns
    -------
    volume
        0/1 uint8 on the image's grid, with ``attrs["background"]`` saying where it came from.
    """
    if subj.p.mask and sha is not None:
        mask = external_mask(subj, key, image, image, sha)
        mask.attrs["background"] = {**mask.attrs["background"], "method": "external (given with --preprocessed)"}
        return mask
    rule = {"method": "given", "rule": "non-zero voxels of the preprocessed image"}
    mask = like(
        image,
        (image.data != 0).astype(np.uint8),
        kind="mask",
        name="brain_mask",
        step=provenance_record("import", rule, subj.input_checksums()),
    )
    mask.attrs["background"] = rule
    return mask
