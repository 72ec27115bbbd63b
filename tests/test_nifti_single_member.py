"""Every ``.nii.gz`` helm-dask writes is ONE gzip member (issue 20, item 3), read identically by zlib, ``gzip -t``,
nibabel and nifti-reader-js (the reader browser viewers use, under Node; it stops after the first member, so a
multi-member file reads as zeros there).

The workers deflate the slabs as raw DEFLATE parts ending in a sync flush; the writer adds one gzip header and a
trailer whose CRC-32 is combined part by part (``isal``'s ``crc32_combine``, or the pure-Python GF(2) fallback,
tested here against ISA-L's and against zlib's CRC of the concatenated bytes).

The Node reader: ``tests/js`` pins nifti-reader-js (package-lock.json, from the npm registry). When
``tests/js/node_modules`` is missing the fixture runs ``npm ci`` in a temporary copy; it skips only when ``node``
or ``npm`` is absent AND ``HELM_REQUIRE_NODE`` is unset (CI sets it, so there it never skips).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helm_dask.io import nifti as nii
from helm_dask.io import nifti_to_zarr, open_volume, save_nifti, save_volume, zarr_to_nifti
from helm_dask.volume import make_volume

JS_DIR = Path(__file__).parent / "js"
JS_FILES = ("package.json", "package-lock.json", "read_nifti.mjs")
TILTED = np.array(
    [[0.9, -0.2, 0.05, -40.0], [0.2, 0.85, -0.1, 12.5], [-0.03, 0.12, 1.1, 7.25], [0.0, 0.0, 0.0, 1.0]]
)  # an oblique affine with unequal voxel sizes: every header float matters


# ----------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="session")
def js_reader(tmp_path_factory) -> Path:
    """The folder holding read_nifti.mjs with nifti-reader-js installed (npm ci into a temporary copy if needed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("HELM_REQUIRE_NODE"):
            pytest.fail("HELM_REQUIRE_NODE is set but node/npm are not on PATH (install Node.js >= 18)")
        pytest.skip("node/npm not installed (set HELM_REQUIRE_NODE=1 to make this a failure)")
    if (JS_DIR / "node_modules" / "nifti-reader-js").is_dir():
        return JS_DIR
    work = tmp_path_factory.mktemp("js")
    for name in JS_FILES:
        shutil.copy(JS_DIR / name, work / name)
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work, check=True, capture_output=True
    )
    return work


def read_with_js(js_dir: Path, path: Path) -> dict:
    out = subprocess.run(
        ["node", str(js_dir / "read_nifti.mjs"), str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def gunzip_one_member(path: Path) -> bytes:
    """The file's payload, asserting that it is exactly one gzip member (zlib checks its CRC-32 and size)."""
    raw = Path(path).read_bytes()
    d = zlib.decompressobj(31)
    out = d.decompress(raw) + d.flush()
    assert d.eof, f"{path}: the gzip stream does not end"
    assert d.unused_data == b"", f"{path}: {len(d.unused_data)} bytes after the first gzip member"
    assert raw[:2] == nii.GZ_MAGIC
    return out


def _unscaled_bytes(img) -> bytes:
    return np.asarray(img.dataobj.get_unscaled(), dtype=img.get_data_dtype()).tobytes(order="F")


def check_file(path: Path, js_dir: Path, expected_data: bytes | None = None) -> dict:
    """One member; ``gzip -t``; the payload is nibabel's header + data; nifti-reader-js reads what nibabel reads."""
    payload = gunzip_one_member(path)
    subprocess.run(["gzip", "-t", str(path)], check=True)
    img = nib.load(path)
    offset = int(img.dataobj.offset)  # the loaded header says 0 (nibabel recomputes it when saving)
    data_bytes = _unscaled_bytes(img)
    assert payload[offset:] == data_bytes and len(payload) == offset + len(data_bytes)
    if expected_data is not None:
        assert payload[offset:] == expected_data
    js = read_with_js(js_dir, path)
    assert js["compressed"] and js["decompressed_bytes"] == len(payload)
    assert js["dims"][0] == len(img.shape) and js["dims"][1 : 1 + len(img.shape)] == list(img.shape)
    assert js["datatype"] == int(img.header["datatype"]) and js["vox_offset"] == offset
    assert js["sform_code"] == int(img.header["sform_code"]) and js["intent_code"] == int(img.header["intent_code"])
    np.testing.assert_allclose(np.array(js["affine"]), img.affine, rtol=0, atol=1e-6)
    assert js["image_bytes"] == len(data_bytes)
    assert js["sha256"] == hashlib.sha256(data_bytes).hexdigest()
    values = np.asarray(img.dataobj.get_unscaled())
    assert js["sum"] == pytest.approx(float(values.sum(dtype=np.float64)), rel=1e-9, abs=1e-6)
    return js


@pytest.fixture(params=["isal", "zlib"])
def gzip_backend(request, monkeypatch):
    """ISA-L (the default when installed), and the fallback without it: zlib and the pure-Python CRC combine."""
    if request.param == "zlib":
        monkeypatch.setattr(nii, "_igzip", None)
        monkeypatch.setattr(nii, "_isal_zlib", None)
    elif nii._igzip is None:
        pytest.skip("isal is not installed")
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# CRC-32 combination and the member writer


def test_isal_has_crc32_combine():
    """pyproject pins isal >= 1.6; isal_zlib.crc32_combine exists since 1.4.0."""
    from isal import isal_zlib

    assert isal_zlib.crc32_combine(zlib.crc32(b"ab"), zlib.crc32(b"cd"), 2) == zlib.crc32(b"abcd")


def test_crc32_combine_py_matches_zlib_and_isal():
    from isal import isal_zlib

    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 7), (3, 65_537), (100_000, 123_457)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        want = zlib.crc32(a + b)
        assert nii.crc32_combine_py(zlib.crc32(a), zlib.crc32(b), n2) == want
        assert nii.crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == want
    # lengths past 4 GiB, where only the algebra can be checked: against ISA-L's C implementation
    for len2 in (2**32 - 1, 2**32, 2**32 + 1, 5 * 2**30 + 3, 2**40 + 12_345):
        c1, c2 = (int(x) for x in rng.integers(0, 2**32, size=2))
        assert nii.crc32_combine_py(c1, c2, len2) == isal_zlib.crc32_combine(c1, c2, len2)
    # and a 4 GiB + 3 byte second block against CRCs run over the bytes (ISA-L's crc32: 0.2 s; zlib's takes 2 s)
    head, chunk = b"helm", bytes(2**26)
    crc_b, crc_ab = 0, isal_zlib.crc32(head)
    for piece in [chunk] * 64 + [b"\x00\x00\x03"]:
        crc_b, crc_ab = isal_zlib.crc32(piece, crc_b), isal_zlib.crc32(piece, crc_ab)
    assert nii.crc32_combine_py(zlib.crc32(head), crc_b, 2**32 + 3) == crc_ab


def test_member_writer_parts(gzip_backend):
    """Header part, empty parts, all-zero and random parts, levels 1 and 6: one member, exact bytes, zlib's CRC."""
    rng = np.random.default_rng(1)
    pieces = [b"header+extension" * 23, b"", bytes(70_000), rng.bytes(50_000), b"", b"x", rng.bytes(3)]
    for level in (1, 6):
        bio = io.BytesIO()
        w = nii.GzipMemberWriter(bio, level)
        w.write_bytes(pieces[0])
        parts = [nii.deflate_part(p, level) for p in pieces[1:]]
        assert [p.size for p in parts] == [len(p) for p in pieces[1:]]
        assert all(p.crc32 == zlib.crc32(b) for p, b in zip(parts, pieces[1:], strict=True))
        for p in parts:
            assert p.data.endswith(b"\x00\x00\xff\xff")  # sync flush: byte-aligned, not final
            w.write(p)
        w.close()
        raw = bio.getvalue()
        d = zlib.decompressobj(31)
        assert d.decompress(raw) == b"".join(pieces) and d.eof and d.unused_data == b""
        assert gzip.decompress(raw) == b"".join(pieces)
        assert raw[-8:] == zlib.crc32(b"".join(pieces)).to_bytes(4, "little") + len(b"".join(pieces)).to_bytes(
            4, "little"
        )
        assert raw[8] == (4 if level == 1 else 0)  # XFL


def test_level_1_is_isal_and_others_zlib():
    """Level 1 parts are ISA-L's DEFLATE (as the whole-member writer was), other levels exactly zlib's."""
    from isal import isal_zlib

    data = (np.arange(300_000) % 251).astype(np.uint8).tobytes()
    c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
    assert nii.deflate_part(data, 1).data == c.compress(data) + c.flush(isal_zlib.Z_SYNC_FLUSH)
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert nii.deflate_part(data, 6).data == z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)


@pytest.mark.slow
def test_member_over_4_gib_has_size_modulo_2_32(tmp_path):
    """4 GiB + 1 MiB in 17 parts: ISIZE is the size mod 2**32 and the CRC the combined one, both of which zlib's
    inflate checks at the end of the member ("incorrect length check" / "incorrect data check"). ``gzip -t``
    is left out here: it takes 15-40 s on these 4 GiB, and checks the same two fields."""
    zeros = nii.deflate_part(bytes(2**28))  # 256 MiB of zeros, deflated once, written 16 times
    tail = np.random.default_rng(2).bytes(2**20)
    out = tmp_path / "big.gz"
    with open(out, "wb") as f:
        w = nii.GzipMemberWriter(f)
        for _ in range(16):
            w.write(zeros)
        w.write(nii.deflate_part(tail))
        w.close()
    total = 16 * 2**28 + 2**20
    raw = out.read_bytes()
    assert int.from_bytes(raw[-4:], "little") == total % 2**32 == 2**20
    d, seen, last = zlib.decompressobj(31), 0, b""
    buf = raw
    while not d.eof:
        piece = d.decompress(buf, 2**26)
        buf = d.unconsumed_tail
        seen += len(piece)
        last = (last + piece)[-(2**20) :]
    assert seen == total and d.unused_data == b"" and last == tail


# ----------------------------------------------------------------------------------------------------------------
# every kind of file helm-dask writes


def test_multi_member_file_fails_in_js(tmp_path, js_reader):
    """The reader catches today's bug: the old layout (header member + one member per slab) reads as zeros."""
    data = np.arange(6 * 5 * 8, dtype=np.uint16).reshape(6, 5, 8) + 1
    hdr = nii.build_header(data.shape, data.dtype, np.eye(4), kind="labels")
    body = data.tobytes(order="F")
    old = tmp_path / "old.nii.gz"
    old.write_bytes(nii.gzip_member(nii.header_bytes(hdr)) + nii.gzip_member(body[:240]) + nii.gzip_member(body[240:]))
    assert gzip.decompress(old.read_bytes()) == nii.header_bytes(hdr) + body  # valid gzip for zlib ...
    res = subprocess.run(["node", str(js_reader / "read_nifti.mjs"), str(old)], capture_output=True, text=True)
    # ... but not for the browser reader: an error (the first member is too short for the image) or other bytes
    assert res.returncode != 0 or json.loads(res.stdout)["sha256"] != hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("slab_mb", [0.01, 32])
def test_float_image_with_provenance(tmp_path, js_reader, gzip_backend, slab_mb):
    """A tilted float32 image with a provenance extension, many slabs or one; the .nii.gz payload is the .nii."""
    data = np.random.default_rng(3).normal(size=(31, 23, 40)).astype(np.float32)
    vol = make_volume(data, TILTED)
    prov = {"stage": "bias", "note": "x" * 500}  # a header extension longer than one DEFLATE window piece
    gz = save_nifti(vol, tmp_path / "img.nii.gz", provenance=prov, slab_mb=slab_mb)
    plain = save_nifti(vol, tmp_path / "img.nii", provenance=prov, slab_mb=slab_mb)
    js = check_file(Path(gz), js_reader, data.tobytes(order="F"))
    assert gunzip_one_member(Path(gz)) == Path(plain).read_bytes()
    assert js["vox_offset"] > 352 and nii.read_nifti_provenance(gz) == prov


def test_uint16_labels_with_empty_slabs(tmp_path, js_reader, gzip_backend):
    """A uint16 label map whose first and last slabs are all zero (the smallest parts), at levels 1 and 9."""
    labels = np.zeros((40, 36, 48), np.uint16)
    labels[5:30, 4:20, 12:36] = 1002
    labels[10:38, 18:35, 20:30] = 2035
    vol = make_volume(labels, np.diag([0.7, 0.7, 0.9, 1.0]), kind="labels")
    for level in (1, 9):
        out = save_nifti(vol, tmp_path / f"lab{level}.nii.gz", compresslevel=level, slab_mb=0.02, overwrite=True)
        js = check_file(Path(out), js_reader, labels.tobytes(order="F"))
        assert js["intent_code"] == nii.INTENT_LABEL and js["datatype"] == 512


def test_four_d_volume(tmp_path, js_reader):
    """A 4-D file (three volumes): the slabs of every volume in one member."""
    data = np.random.default_rng(4).integers(-300, 3000, size=(12, 14, 16, 3)).astype(np.int16)
    out = save_nifti(make_volume(data, TILTED), tmp_path / "me.nii.gz", slab_mb=0.001)
    js = check_file(Path(out), js_reader, data.tobytes(order="F"))
    assert js["dims"][:5] == [4, 12, 14, 16, 3]


def test_zarr_to_nifti_outputs(tmp_path, js_reader):
    """convert zarr -> nii.gz: a scaled int16 import round trip (bit-exact raw values) and a stored float volume."""
    raw = np.random.default_rng(5).integers(0, 4000, size=(20, 18, 33)).astype(np.int16)
    src = tmp_path / "scaled.nii"
    img = nib.Nifti1Image(raw, TILTED)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, src)
    store = nifti_to_zarr(src, tmp_path / "scaled.zarr", chunks=(20, 18, 8))["path"]
    out = zarr_to_nifti(store, tmp_path / "back.nii.gz")
    check_file(Path(out), js_reader, raw.tobytes(order="F"))
    back = nib.load(out)
    assert (back.dataobj.slope, back.dataobj.inter) == (0.5, 10.0)  # the loaded header itself says (None, None)
    data = np.random.default_rng(6).random((25, 21, 40)).astype(np.float32)
    store2 = save_volume(make_volume(data, TILTED), tmp_path / "f.zarr", chunks=(25, 21, 8))
    out2 = save_nifti(open_volume(store2), tmp_path / "f.nii.gz", slab_mb=0.005)  # thinner than a chunk
    check_file(Path(out2), js_reader, data.tobytes(order="F"))


@pytest.mark.slow
@pytest.mark.e2e
def test_every_file_of_a_pipeline_run(tmp_path, js_reader):
    """The phantom's files and every NIfTI export of a small pipeline run."""
    from helm_dask.phantom_io import write_phantom
    from helm_dask.pipeline import RunParams, run_subject

    ph = tmp_path / "ph"
    write_phantom(ph, spacing_mm=2.0, side="L", seed=1)
    params = RunParams(
        scan=str(ph / "scan.nii.gz"),
        hypothalamus=str(ph / "hypothalamus.nii.gz"),
        out=str(tmp_path / "out"),
        side="auto",
        spacing=2.5,
        ks=(4,),
    )
    run_subject(params, quiet=True)
    files = sorted(tmp_path.rglob("*.nii.gz"))
    names = {f.name for f in files}
    assert {"scan.nii.gz", "preprocessed.nii.gz", "mask.nii.gz", "bias.nii.gz", "label_map_k4.nii.gz"} <= names
    assert len(files) >= 12
    for f in files:
        check_file(f, js_reader)
