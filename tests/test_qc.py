"""QC report: the page parses, every figure is a real PNG, volumes match NumPy, missing outputs are listed,
only planes and chunk-sized pieces are ever in memory, and (if Chromium is installed) the page renders."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dask.callbacks import Callback

from helm_dask.errors import HelmError
from helm_dask.io import open_volume
from helm_dask.io.store import save_volume
from helm_dask.phantom_io import write_phantom
from helm_dask.pipeline import RunParams, run_subject
from helm_dask.qc import choose_level, hypothalamus_box, write_qc_report
from helm_dask.volume import make_volume, voxel_to_world

KS = (4, 6)
SMALL_CHUNKS = (16, 16, 16)  # for the memory test: a plane then touches a few chunks, not the whole volume
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """ONE pipeline's worth of work: run --until preprocess, copy that folder, then resume to the end."""
    root = tmp_path_factory.mktemp("qc")
    write_phantom(root / "ph", spacing_mm=2.0, side="L", seed=1)
    params = RunParams(
        scan=str(root / "ph" / "scan.nii.gz"),
        hypothalamus=str(root / "ph" / "hypothalamus.nii.gz"),
        out=str(root / "out"),
        subject="phL",
        spacing=2.5,
        ks=KS,
        until="preprocess",
    )
    run_subject(params, quiet=True)
    pre = root / "out" / "phL_pre"
    shutil.copytree(root / "out" / "phL", pre)
    run_subject(replace(params, until="mirror"), quiet=True)  # resumes: only kmeans, merge, mirror run
    full = root / "out" / "phL"
    return {"full": full, "pre": pre, "full_report": write_qc_report(full), "pre_report": write_qc_report(pre)}


# -- helpers ---------------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self.body = [], [], {}
        self._text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "tr" and "data-code" in a:
            self.rows.append(a)
        elif tag == "body":
            self.body = a

    def handle_data(self, data):
        self._text.append(data)

    @property
    def text(self):
        return " ".join(self._text)


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _img_bytes(img: dict, report: Path) -> bytes:
    src = img["src"]
    if src.startswith("data:image/png;base64,"):
        return base64.b64decode(src.split(",", 1)[1], validate=True)
    assert "://" not in src, f"external resource {src}"
    return (report.parent / src).read_bytes()


# -- the page ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_report_figures_are_valid_pngs(subjects):
    report = subjects["full_report"]
    assert report == subjects["full"] / "qc" / "report.html"
    page = _parse(report)
    assert len(page.imgs) == 6  # raw, bias, segmentation, close-up, label map, histogram
    for img in page.imgs:
        w, h = _png_size(_img_bytes(img, report))
        assert w > 300 and h > 200, (img.get("alt"), w, h)
    # the embedded figures are also kept as files, byte for byte
    files = {p.name: p.read_bytes() for p in (report.parent).glob("*.png")}
    assert len(files) == 6
    assert {_img_bytes(i, report) for i in page.imgs} == set(files.values())
    text = report.read_text()
    assert "<link" not in text and "http://" not in text and "https://" not in text  # self-contained


@pytest.mark.e2e
@pytest.mark.slow
def test_report_facts(subjects):
    d = subjects["full"]
    text = _parse(subjects["full_report"]).text
    tr = json.loads((d / "transform.json").read_text())["transform"]
    assert "helm-dask QC report" in text and "phL" in text
    assert "left (L)" in text
    assert f"{100 * tr['fraction_across']:.3f} % of the mask across" in text
    assert f"gap {tr['gap_mm']:.2f} mm" in text
    km = json.loads((d / "kmeans.json").read_text())["results"]["4"]  # default k: middle of (4, 6) -> 4
    assert "k = 4 shown" in text and f"{km['centroids'][0]:.4g}" in text
    summary = json.loads((d / "qc" / "qc.json").read_text())
    assert summary["k"] == 4 and summary["ks"] == [4, 6] and summary["missing"] == []
    assert summary["histogram"]["counts"] == km["extra"]["histogram"]["counts"]


@pytest.mark.e2e
@pytest.mark.slow
def test_volume_table_matches_numpy(subjects):
    d = subjects["full"]
    img = nib.load(d / "hypothalamus.nii.gz")
    lab = np.asarray(img.dataobj)
    vox = abs(np.linalg.det(img.affine[:3, :3]))
    codes, counts = np.unique(lab[lab > 0], return_counts=True)
    expected = {int(c): n * vox for c, n in zip(codes, counts)}
    assert set(range(801, 806)) <= set(expected)
    closed = open_volume(d / "helm.zarr" / "closed_labels").values
    cc, cn = np.unique(closed[closed > 0], return_counts=True)
    expected_closed = {int(c): n * vox for c, n in zip(cc, cn)}
    rows = {int(r["data-code"]): r for r in _parse(subjects["full_report"]).rows}
    assert set(rows) == set(expected)
    for c, v in expected.items():
        # the NIfTI header stores the affine in float32: volumes agree to its precision
        assert float(rows[c]["data-manual-mm3"]) == pytest.approx(v, rel=1e-6)
        assert float(rows[c]["data-closed-mm3"]) == pytest.approx(expected_closed.get(c, 0.0), rel=1e-6)
    csv = (d / "qc" / "label_volumes.csv").read_text().splitlines()
    assert csv[0] == "code,name,manual_mm3,after_closing_mm3"
    assert any(line.startswith("801,L_hypothalamus_anterior_inferior,") for line in csv)


@pytest.mark.e2e
@pytest.mark.slow
def test_until_preprocess_report_lists_missing(subjects):
    report = subjects["pre_report"]
    page = _parse(report)
    text = page.text
    assert "Missing outputs" in text
    for name in ("kmeans.json", "kmeans_k*", "closed_labels", "hemi_k*", "label_map_k*", "transform.json"):
        assert name in text, name
    assert "Not available" in text
    # raw, bias, preprocessed, close-up and a histogram (computed from the volume: no kmeans.json) remain
    assert len(page.imgs) == 5
    for img in page.imgs:
        w, h = _png_size(_img_bytes(img, report))
        assert w > 300 and h > 200
    rows = {int(r["data-code"]): r for r in page.rows}
    assert set(range(801, 806)) <= set(rows) and all("data-closed-mm3" not in r for r in rows.values())
    summary = json.loads((report.parent / "qc.json").read_text())
    assert summary["k"] is None and "label_map_k*" in summary["missing"]


@pytest.mark.e2e
@pytest.mark.slow
def test_fallback_histogram_matches_numpy(subjects):
    d = subjects["pre"]
    hist = json.loads((d / "qc" / "qc.json").read_text())["histogram"]
    pre = open_volume(d / "helm.zarr" / "preprocessed").values
    msk = open_volume(d / "helm.zarr" / "mask").values
    vals = pre[msk != 0]
    edges = np.linspace(float(vals.min()), float(vals.max()), 129)
    counts, _ = np.histogram(vals, bins=edges)
    np.testing.assert_allclose(hist["edges"], edges, rtol=1e-12)
    got = np.asarray(hist["counts"], dtype=np.int64)
    # exact, except that a float32 value within one float32 step of a (float64) edge is a tie that numpy's
    # uniform-bin path may put on either side (seen: 59.645145 against the edge 59.6451473)
    ulp = np.spacing(np.abs(edges[1:-1]).astype(vals.dtype)).astype(np.float64)
    ties = np.abs(vals.astype(np.float64)[:, None] - edges[None, 1:-1]) <= ulp
    tied_bins = np.flatnonzero(ties.any(axis=0))
    moved = got != counts
    assert set(np.flatnonzero(moved)) <= set(tied_bins) | set(tied_bins + 1), (np.flatnonzero(moved), tied_bins)
    assert np.abs(got - counts).sum() <= 2 * int(ties.sum())
    assert int(np.sum(hist["counts"])) == int((msk != 0).sum())


@pytest.mark.e2e
@pytest.mark.slow
def test_hypothalamus_box_matches_numpy(subjects):
    d = subjects["full"]
    b = hypothalamus_box(d, "hypothalamus")
    lab = open_volume(d / "helm.zarr" / "hypothalamus").values
    idx = np.argwhere(lab != 0)
    aff = open_volume(d / "helm.zarr" / "hypothalamus").attrs["affine"]
    np.testing.assert_allclose(b["centroid_mm"], voxel_to_world(aff, idx.mean(axis=0)[None])[0], atol=1e-9)
    assert b["voxels"] == len(idx)
    for ax, (lo, hi) in enumerate(b["box"]):
        assert lo <= idx[:, ax].min() and hi > idx[:, ax].max()
        assert hi - lo <= idx[:, ax].max() - idx[:, ax].min() + 3  # tight: one voxel of margin per side


def test_choose_level(tmp_path):
    vol = make_volume(np.zeros((260, 40, 30), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]))
    p = tmp_path / "v.zarr"
    save_volume(vol, p, chunks=(64, 64, 64))
    shapes = [open_volume(p, level=lev).shape for lev in range(3)]
    assert shapes == [(260, 40, 30), (130, 20, 15), (65, 10, 7)]
    assert choose_level(p, 512) == 0 and choose_level(p, 260) == 0 and choose_level(p, 259) == 1
    assert choose_level(p, 100) == 2 and choose_level(p, 20) == 2  # none small enough: the coarsest


@pytest.mark.e2e
@pytest.mark.slow
def test_bad_inputs(subjects, tmp_path):
    with pytest.raises(HelmError, match="subject folder not found"):
        write_qc_report(tmp_path / "nope")
    with pytest.raises(HelmError, match="no helm.zarr"):
        write_qc_report(tmp_path)
    with pytest.raises(HelmError, match=r"k = 5.*ks present: 4, 6"):
        write_qc_report(subjects["full"], k=5)


# -- bounded memory ---------------------------------------------------------------------------------------------


class _Largest(Callback):
    """Records the largest NumPy array any Dask task produced (chunks, planes, reductions, final results)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.what, self.tasks = 0, None, 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.tasks += 1
        if isinstance(result, np.ndarray) and result.nbytes > self.nbytes:
            self.nbytes, self.what = result.nbytes, (key, result.shape, result.dtype)


def _rechunked_copy(src: Path, dst: Path, chunks) -> Path:
    """The subject folder with every stored volume rewritten on small chunks (same data, same affines)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("helm.zarr", "qc"))
    for store in sorted(p for p in (src / "helm.zarr").iterdir() if p.is_dir()):  # (helm.zarr/zarr.json: the group)
        save_volume(open_volume(store), dst / "helm.zarr" / store.name, chunks=chunks)
    return dst


@pytest.mark.e2e
@pytest.mark.slow
def test_only_planes_and_chunks_are_in_memory(subjects, tmp_path):
    d = _rechunked_copy(subjects["full"], tmp_path / "phL", SMALL_CHUNKS)
    names = (
        "scan_raw",
        "mask_ras",
        "image_ws",
        "bias",
        "preprocessed",
        "mask",
        "hypothalamus",
        "kmeans_k6",
        "hemi_k6",
        "closed_labels",
        "label_map_k6",
    )
    vols = {n: open_volume(d / "helm.zarr" / n) for n in names}
    assert all(v.data.chunksize == SMALL_CHUNKS for v in vols.values())
    # the largest plane of any level-0 volume, as float64; and the smallest whole volume
    plane_bound = max(int(np.prod(v.shape)) // min(v.shape) for v in vols.values()) * 8
    chunk_bound = int(np.prod(SMALL_CHUNKS)) * 8
    smallest_volume = min(v.nbytes for v in vols.values())
    bound = max(plane_bound, chunk_bound)
    assert bound < smallest_volume / 2  # the check below can tell a plane from a volume
    rec = _Largest()
    with rec:
        write_qc_report(d, k=6)
    assert rec.tasks > 100  # the callback saw the work (planes, projections, counts)
    assert rec.nbytes <= bound, rec.what
    # the check works: reading a whole volume trips it
    rec2 = _Largest()
    with rec2:
        _ = vols["preprocessed"].values
    assert rec2.nbytes > bound
    assert "k = 6" in (d / "qc" / "report.html").read_text()


# -- headless browser -----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(subjects, tmp_path):
    report = subjects["full_report"]
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = report.resolve().as_uri()
    # the page's onload script counts the images that did not decode
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    body = _Page()
    body.feed(dom)
    assert body.body.get("data-images-total") == "6", dom[:300]
    assert body.body.get("data-images-broken") == "0"
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from matplotlib.image import imread

    px = imread(shot)[..., :3]
    assert px.shape[0] >= 2000 and px.shape[1] >= 1200
    non_white = (px < 0.9).any(axis=-1).mean()
    assert non_white > 0.05  # figures drawn, not a blank page
    assert px.std() > 0.1


def test_qc_and_the_notebooks_share_the_drawing_code(tmp_path):
    """One choose_level for stores and volumes; the page is a template that escapes what it is given."""
    from helm_dask import draw, qc, view

    assert qc.choose_level is view.choose_level is draw.choose_level
    vol = make_volume(np.zeros((260, 40, 30), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]))
    p = save_volume(vol, tmp_path / "v.zarr", chunks=(64, 64, 64))
    # a volume may be shown beyond its store's levels (strides); a store path only names levels it has
    assert choose_level(open_volume(p), 20) == 4 and choose_level(p, 20) == 2
    page = qc._template().render(
        subject="<b>x</b>",
        facts=[("Run", "a < b")],
        figures=[qc._Figure(None, "T", "Not available: missing scan_raw.")],
        missing=[],
        volumes=[],
        have_manual=False,
        have_closed=False,
        vox_mm3=None,
        agreement=None,
        agreement_title="",
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a &lt; b" in page and "<b>x</b>" not in page
    assert 'href="#volumes"' in page and "Not available: missing scan_raw." in page
