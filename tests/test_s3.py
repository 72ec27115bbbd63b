"""Object storage: inputs, intermediates and outputs on s3:// URLs, served by moto's S3 server on 127.0.0.1.

What is checked: NIfTI <-> Zarr conversion through S3 gives the same bytes as on local disk; ``info`` on URLs;
storage options from ``--storage-options`` and from the environment; an existing object is refused without
--overwrite; a failed upload (after a multipart part went up) leaves no object, no pending upload, no scratch
store, and an older object untouched; a pipeline run with everything on S3 gives the same NIfTI data, headers,
JSON and lut.txt as the same run on local disk, a rerun writes nothing, a run failing midway leaves no final
output and resumes; and on a LocalCluster whose workers have neither the endpoint nor the credentials in their
environment (only ``--storage-options``), the run still works -- and the secret is written nowhere.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import time
from types import SimpleNamespace

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from helm_dask.cli import main  # noqa: E402
from helm_dask.io.nifti import read_nifti_provenance  # noqa: E402
from helm_dask.io.store import is_complete, open_volume, save_volume  # noqa: E402
from helm_dask.phantom_io import write_phantom  # noqa: E402
from helm_dask.pipeline import RunParams, run_subject  # noqa: E402
from helm_dask.volume import make_volume  # noqa: E402

BUCKET = "helm"
KS = "4,5"
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    # Dummy credentials (moto accepts any); no ~/.aws files can interfere.
    empty = tmp_path_factory.mktemp("aws")
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_SHARED_CREDENTIALS_FILE=str(empty / "credentials"),
        AWS_CONFIG_FILE=str(empty / "config"),
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    so = {"endpoint_url": f"http://{host}:{port}"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **so)
    fs.mkdir(BUCKET)
    try:
        yield SimpleNamespace(so=so, opt=["--storage-options", json.dumps(so)], fs=fs, endpoint=so["endpoint_url"])
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli(*args, expect=0):
    code = main([str(a) for a in args])
    assert code == expect, f"exit {code}, expected {expect}: {args}"


def cat(s3, key) -> bytes:
    s3.fs.invalidate_cache()
    return s3.fs.cat(f"{BUCKET}/{key}")


def ls(s3, prefix) -> list[str]:
    s3.fs.invalidate_cache()
    return [k[len(BUCKET) + 1 :] for k in s3.fs.find(f"{BUCKET}/{prefix}")]


def pending_uploads(s3) -> list:
    return s3.fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])


# ----------------------------------------------------------------------------------------------------------------
# convert / info


@pytest.fixture(scope="module")
def small_nifti(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    data = (np.random.default_rng(0).normal(size=(20, 18, 16)) * 100).astype(np.int16)
    aff = np.array([[0, 0, 0.2, 1], [-0.2, 0, 0, 2], [0, -0.2, 0, 3], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(data, aff)
    img.header.set_slope_inter(0.5, 3.0)  # scaled: the raw values and the scaling must both survive
    nib.save(img, d / "a.nii.gz")
    return d / "a.nii.gz", data


def test_convert_round_trip_through_s3_equals_local(s3, small_nifti, tmp_path, capsys):
    src, data = small_nifti
    common = ["--chunks", "8", "--scheduler", "threads", "--quiet"]
    # local reference
    cli("convert", src, tmp_path / "a.zarr", *common)
    cli("convert", tmp_path / "a.zarr", tmp_path / "back.nii.gz", "--scheduler", "threads", "--quiet")
    # local NIfTI -> S3 Zarr -> S3 NIfTI
    cli("convert", src, f"s3://{BUCKET}/conv/a.zarr", *common, *s3.opt)
    cli(
        "convert",
        f"s3://{BUCKET}/conv/a.zarr",
        f"s3://{BUCKET}/conv/back.nii.gz",
        "--scheduler",
        "threads",
        "--quiet",
        *s3.opt,
    )
    local_back = (tmp_path / "back.nii.gz").read_bytes()
    assert cat(s3, "conv/back.nii.gz") == local_back
    back = nib.load(tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(back.dataobj.get_unscaled()), data)
    # S3 NIfTI input -> S3 Zarr -> local NIfTI
    s3.fs.put(str(src), f"{BUCKET}/conv/in.nii.gz")
    cli("convert", f"s3://{BUCKET}/conv/in.nii.gz", f"s3://{BUCKET}/conv/b.zarr", *common, *s3.opt)
    cli(
        "convert", f"s3://{BUCKET}/conv/b.zarr", tmp_path / "back2.nii.gz", "--scheduler", "threads", "--quiet", *s3.opt
    )
    assert (tmp_path / "back2.nii.gz").read_bytes() == local_back
    # the Zarr stores hold the same chunks as the local one (same keys, same bytes)
    local_keys = sorted(
        str(p.relative_to(tmp_path / "a.zarr"))
        for p in (tmp_path / "a.zarr").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    remote_keys = sorted(k[len("conv/b.zarr/") :] for k in ls(s3, "conv/b.zarr") if not k.endswith("zarr.json"))
    # 20 x 18 x 16 in 8^3 chunks, no pyramid; plus one chunk per coordinate array (x, y, z)
    assert remote_keys == local_keys and len(local_keys) == 3 * 3 * 2 + 3
    for k in local_keys:
        assert cat(s3, f"conv/b.zarr/{k}") == (tmp_path / "a.zarr" / k).read_bytes(), k
    vol = open_volume(f"s3://{BUCKET}/conv/b.zarr", storage_options=s3.so)
    np.testing.assert_array_equal(vol.values, data * np.float32(0.5) + np.float32(3.0))

    # info on URLs: same as local except path and size
    capsys.readouterr()
    for local, url in ((tmp_path / "a.zarr", f"s3://{BUCKET}/conv/a.zarr"), (src, f"s3://{BUCKET}/conv/in.nii.gz")):
        cli("info", local, "--json")
        d_local = json.loads(capsys.readouterr().out)
        cli("info", url, "--json", *s3.opt)
        d_url = json.loads(capsys.readouterr().out)
        assert d_url["path"] == url and d_url["size_bytes"] > 0
        if str(url).endswith(".nii.gz"):
            assert d_url["size_bytes"] == os.path.getsize(src)
        for k in ("path", "size_bytes"):
            d_local.pop(k), d_url.pop(k)
        assert d_url == d_local


def test_storage_options_from_the_environment_and_errors(s3, small_nifti, monkeypatch, capsys):
    src, _ = small_nifti
    s3.fs.put(str(src), f"{BUCKET}/env/in.nii.gz")
    # No --storage-options: botocore reads the endpoint from AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    capsys.readouterr()
    cli("info", f"s3://{BUCKET}/env/in.nii.gz", "--json")
    assert json.loads(capsys.readouterr().out)["shape"] == [20, 18, 16]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    # Missing objects and bad options: one line, non-zero exit.
    cli("info", f"s3://{BUCKET}/env/nope.zarr", *s3.opt, expect=2)
    assert "store not found" in capsys.readouterr().err
    cli("info", f"s3://{BUCKET}/env/nope.nii.gz", *s3.opt, expect=2)
    assert "not found" in capsys.readouterr().err
    cli("info", f"s3://{BUCKET}/env/in.nii.gz", "--storage-options", "[1, 2]", expect=2)
    assert "JSON object" in capsys.readouterr().err
    cli("info", f"s3://{BUCKET}/env/in.nii.gz", "--storage-options", "{bad json", expect=2)
    assert "not valid JSON" in capsys.readouterr().err
    # an existing output is refused without --overwrite (exit 3), for a store and for a file
    cli("convert", src, f"s3://{BUCKET}/env/a.zarr", "--scheduler", "threads", "--quiet", *s3.opt)
    cli("convert", src, f"s3://{BUCKET}/env/a.zarr", "--scheduler", "threads", "--quiet", *s3.opt, expect=3)
    cli(
        "convert",
        f"s3://{BUCKET}/env/a.zarr",
        f"s3://{BUCKET}/env/in.nii.gz",
        "--scheduler",
        "threads",
        "--quiet",
        *s3.opt,
        expect=3,
    )
    assert "already exists" in capsys.readouterr().err
    assert cat(s3, "env/in.nii.gz") == src.read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# atomicity


def test_failed_uploads_leave_nothing(s3, monkeypatch):
    import helm_dask.io.nifti as nii

    # 128^3 float32 (8 MiB) in slabs of 8 planes (512 KiB) with 5 MiB upload parts: the failure comes after a
    # multipart part went up, and the thin scratch copy (slabs thinner than the 64-voxel chunks) lives on S3 too.
    so = dict(s3.so, default_block_size=5 * 2**20)
    rng = np.random.default_rng(1)
    vol = make_volume(da.from_array(rng.random((128, 128, 128), dtype=np.float32), chunks=64), np.eye(4))
    url = f"s3://{BUCKET}/fail/out.nii"
    real = nii.encode_slab
    seen = {"slabs": 0, "pending_before_failure": None}

    def dying(arr, dtype, gz, level=1):
        seen["slabs"] += 1
        if seen["slabs"] == 16:  # the last slab: 14 were already handed to the upload
            seen["pending_before_failure"] = len(pending_uploads(s3))
            raise RuntimeError("worker lost")
        return real(arr, dtype, gz, level)

    monkeypatch.setattr(nii, "encode_slab", dying)
    from helm_dask.io.convert import save_nifti

    with pytest.raises(RuntimeError, match="worker lost"):
        save_nifti(vol, url, slab_mb=0.5, storage_options=so)
    assert seen["pending_before_failure"] == 1  # a multipart upload was under way ...
    assert pending_uploads(s3) == []  # ... and was aborted
    assert ls(s3, "fail") == []  # no object, no scratch store
    # an older object is untouched by a failed overwrite
    s3.fs.pipe(f"{BUCKET}/fail/out.nii", b"old")
    seen["slabs"] = 0
    with pytest.raises(RuntimeError, match="worker lost"):
        save_nifti(vol, url, slab_mb=0.5, storage_options=so, overwrite=True)
    assert cat(s3, "fail/out.nii") == b"old" and ls(s3, "fail") == ["fail/out.nii"]
    assert pending_uploads(s3) == []
    # and the same write, not interrupted, gives nibabel's reading of the data; it also removes the scratch copy
    # a killed writer of this output left behind (and not another output's)
    s3.fs.pipe(f"{BUCKET}/fail/.out.nii.thin-dead0000.zarr/zarr.json", b"{}")
    s3.fs.pipe(f"{BUCKET}/fail/.other.nii.thin-dead0000.zarr/zarr.json", b"{}")
    monkeypatch.setattr(nii, "encode_slab", real)
    save_nifti(vol, url, slab_mb=0.5, storage_options=so, overwrite=True)
    img = nib.Nifti1Image.from_bytes(cat(s3, "fail/out.nii"))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.values)
    assert ls(s3, "fail") == ["fail/.other.nii.thin-dead0000.zarr/zarr.json", "fail/out.nii"]  # scratch removed
    s3.fs.rm(f"{BUCKET}/fail/.other.nii.thin-dead0000.zarr", recursive=True)

    # a Zarr volume whose computation fails midway is deleted, not left half written
    def boom(block, block_info=None):
        if block_info is not None and block_info[0]["chunk-location"] == (1, 1, 1):
            raise RuntimeError("chunk failed")
        return block

    bad = make_volume(vol.data.map_blocks(boom, dtype=np.float32), np.eye(4))
    with pytest.raises(RuntimeError, match="chunk failed"):
        save_volume(bad, f"s3://{BUCKET}/fail/v.zarr", chunks=64, storage_options=so)
    # The store is deleted (a chunk task still running when the error surfaced may add a stray chunk object
    # afterwards, but no metadata: nothing that reads as a volume, and the next write wipes the prefix).
    assert not [k for k in ls(s3, "fail/v.zarr") if k.endswith("zarr.json")]
    assert not is_complete(f"s3://{BUCKET}/fail/v.zarr", storage_options=so)


# ----------------------------------------------------------------------------------------------------------------
# the pipeline on S3


@pytest.fixture(scope="module")
def phantom(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root / "ph", spacing_mm=2.0, side="L", seed=1)
    for name in ("scan", "hypothalamus"):
        s3.fs.put(str(root / "ph" / f"{name}.nii.gz"), f"{BUCKET}/in/{name}.nii.gz")
    return root / "ph"


RUN_ARGS = ["--spacing", "2.5", "--k", KS, "--no-qc", "--quiet", "--layout", "helm"]


@pytest.fixture(scope="module")
def local_run(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_out")
    cli(
        "run",
        phantom / "scan.nii.gz",
        "--hypothalamus",
        phantom / "hypothalamus.nii.gz",
        "--out",
        out,
        "--scheduler",
        "threads",
        *RUN_ARGS,
    )
    return out / "scan"


def _nifti_parts(raw: bytes) -> tuple[bytes, bytes, dict]:
    """Header without vox_offset, voxel bytes, and the provenance extension with input paths dropped."""
    raw = gzip.decompress(raw)
    assert int.from_bytes(raw[:4], "little") == 348
    off = int(np.frombuffer(raw[108:112], "<f4")[0])
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:off]), check=False)
    prov = next(json.loads(e.get_content()) for e in hdr.extensions if e.get_code() == 6)
    prov["inputs"] = sorted(prov["inputs"].values())
    for p in prov["provenance"]:
        p["inputs"] = sorted((p.get("inputs") or {}).values())
    return raw[:108] + raw[112:348], raw[off:], prov


S3_RUN = [
    "run",
    f"s3://{BUCKET}/in/scan.nii.gz",
    "--hypothalamus",
    f"s3://{BUCKET}/in/hypothalamus.nii.gz",
    "--out",
    f"s3://{BUCKET}/out",
    "--scheduler",
    "threads",
    *RUN_ARGS,
]


@pytest.fixture(scope="module")
def s3_run(s3, phantom):
    cli(*S3_RUN, *s3.opt)
    return ls(s3, "out/scan")


@pytest.mark.e2e
@pytest.mark.slow
def test_run_on_s3_matches_local(s3, s3_run, local_run):
    keys = s3_run
    local_files = sorted(p.name for p in local_run.iterdir() if p.is_file())
    assert sorted(k.split("/", 2)[2] for k in keys if "/helm.zarr/" not in k) == local_files
    assert {
        "lut.txt",
        "run.json",
        "transform.json",
        "kmeans.json",
        "bias_model.json",
        "label_map_k5.nii.gz",
        "preprocessed.nii.gz",
    } <= set(local_files)
    local_vols = sorted(p.parent.name for p in (local_run / "helm.zarr").glob("*/zarr.json"))
    remote_entries = {k.split("/")[3] for k in keys if "/helm.zarr/" in k}
    assert "zarr.json" in remote_entries  # helm.zarr is a Zarr group there too
    remote_vols = sorted(remote_entries - {"zarr.json"})
    assert remote_vols == local_vols and "label_map_k4" in remote_vols
    n_nifti = 0
    for name in local_files:
        remote = cat(s3, f"out/scan/{name}")
        local = (local_run / name).read_bytes()
        if name.endswith(".nii.gz"):
            # Same header and voxels byte for byte; the provenance differs only by the input paths (S3 vs local).
            h_r, d_r, p_r = _nifti_parts(remote)
            h_l, d_l, p_l = _nifti_parts(local)
            assert h_r == h_l and d_r == d_l and p_r == p_l, name
            n_nifti += 1
        elif name == "run.json":
            run = json.loads(remote)
            assert {s["status"] for s in run["stages"].values()} == {"computed"}
            assert "storage_options" not in run["params"]
            assert [s["key"] for s in run["stages"].values()] == [
                s["key"] for s in json.loads(local)["stages"].values()
            ]
        else:
            assert remote == local, name
    assert n_nifti == 4 + 3 * 2
    # --layout helm: the dataset's folders, copied server-side
    assert cat(s3, "out/label_maps/scan_k5.nii.gz") == cat(s3, "out/scan/label_map_k5.nii.gz")
    assert cat(s3, "out/whole_brain_segmentation/scan_k4.nii.gz") == cat(s3, "out/scan/kmeans_k4.nii.gz")
    assert sorted(k.split("/")[1] for k in ls(s3, "out") if k.count("/") == 2 and "/scan/" not in k) == [
        "hypothalamus",
        "label_maps",
        "label_maps",
        "preprocessed",
        "whole_brain_segmentation",
        "whole_brain_segmentation",
    ]
    # the intermediates too: same voxels in every volume of helm.zarr
    for vol in ("mask", "preprocessed", "hemi_k5", "label_map_k4"):
        np.testing.assert_array_equal(
            open_volume(f"s3://{BUCKET}/out/scan/helm.zarr/{vol}", storage_options=s3.so).values,
            open_volume(local_run / "helm.zarr" / vol).values,
        )


@pytest.mark.e2e
@pytest.mark.slow
def test_rerun_on_s3_writes_nothing_and_a_failed_stage_resumes(s3, s3_run, monkeypatch):
    import helm_dask.io.store as store
    import helm_dask.kmeans as km
    import helm_dask.pipeline as pipeline
    from helm_dask.volume import like

    # A rerun writes nothing but run.json: every stage is up to date.
    def no_write(*a, **kw):
        raise AssertionError("a rerun must not write outputs")

    def etags() -> dict:
        s3.fs.invalidate_cache()
        return {
            k: (info["ETag"], info["LastModified"]) for k, info in s3.fs.find(f"{BUCKET}/out/scan", detail=True).items()
        }

    before = etags()
    time.sleep(1.1)  # LastModified has a resolution of a second: a rewrite of the same bytes shows
    with monkeypatch.context() as m:
        m.setattr(pipeline.subject, "save_nifti", no_write)
        m.setattr(pipeline.steps, "nifti_to_zarr", no_write)
        m.setattr(store, "save_volumes", no_write)
        cli(*S3_RUN, *s3.opt)
    run = json.loads(cat(s3, "out/scan/run.json"))
    assert {s["status"] for s in run["stages"].values()} == {"skipped"}
    assert ls(s3, "out/scan") == s3_run
    after = etags()  # no object rewritten (lut.txt, JSON, chunks) but the run record itself
    assert {k for k in before if before[k] != after[k]} <= {f"{BUCKET}/out/scan/run.json"}

    # Another seed: k-means (only) recomputes, and its maps fail while their stores are being written.
    real = km.kmeans_maps

    def boom(block, block_info=None):
        if block_info is not None and block_info[0]["chunk-location"] == (0, 0, 0):
            raise RuntimeError("worker died")
        return block

    def failing(*a, **kw):
        return {k: like(lab, lab.data.map_blocks(boom, dtype=lab.dtype)) for k, lab in real(*a, **kw).items()}

    url = f"s3://{BUCKET}/out/scan"
    old_key = read_nifti_provenance(f"{url}/kmeans_k4.nii.gz", storage_options=s3.so)["stage_key"]
    params = RunParams(
        scan=f"s3://{BUCKET}/in/scan.nii.gz",
        hypothalamus=f"s3://{BUCKET}/in/hypothalamus.nii.gz",
        out=f"s3://{BUCKET}/out",
        spacing=2.5,
        ks=(4, 5),
        until="kmeans",
        qc=False,
        seed=7,
        storage_options=s3.so,
    )
    monkeypatch.setattr(km, "kmeans_maps", failing)
    with pytest.raises(RuntimeError, match="worker died"):
        run_subject(params, quiet=True)
    # The old NIfTI maps are untouched (no new object replaced them); the map stores are not finished (on object
    # storage a store is rewritten in place) and carry no metadata (deleted; a chunk task still running when the
    # error surfaced may leave a stray chunk object, which the next write wipes).
    assert read_nifti_provenance(f"{url}/kmeans_k4.nii.gz", storage_options=s3.so)["stage_key"] == old_key
    keys = ls(s3, "out/scan")
    for k in (4, 5):
        assert not is_complete(f"{url}/helm.zarr/kmeans_k{k}", storage_options=s3.so)
        assert not [x for x in keys if x.startswith(f"out/scan/helm.zarr/kmeans_k{k}/") and x.endswith("zarr.json")]
    assert not [x for x in keys if "/." in x]  # no hidden scratch or temporary objects
    monkeypatch.setattr(km, "kmeans_maps", real)
    info = run_subject(params, quiet=True)
    st = {k: v["status"] for k, v in info["stages"].items()}
    assert st == {
        "import": "skipped",
        "background": "skipped",
        "resample": "skipped",
        "bias": "skipped",
        "kmeans": "computed",
    }
    new_key = read_nifti_provenance(f"{url}/kmeans_k4.nii.gz", storage_options=s3.so)["stage_key"]
    assert new_key == info["stages"]["kmeans"]["key"] != old_key
    img = nib.Nifti1Image.from_bytes(gzip.decompress(cat(s3, "out/scan/kmeans_k5.nii.gz")))
    assert set(np.unique(np.asanyarray(img.dataobj)).tolist()) == set(range(6))


@pytest.mark.e2e
@pytest.mark.slow
def test_localcluster_workers_get_the_options(s3, phantom, local_run, monkeypatch, tmp_path):
    """Workers see neither the endpoint nor credentials in their environment: only --storage-options."""
    secret = "s3cr3t-only-in-the-options"
    so = dict(s3.so, key="testing", secret=secret)
    (tmp_path / "s3.json").write_text(json.dumps(so))  # @FILE: credentials stay off the command line
    import fsspec

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # Nothing else tells a worker where the server is: one that did not get the options would go to AWS.
    assert not [k for k in os.environ if k.startswith(("AWS_ENDPOINT", "FSSPEC_S3"))]
    assert "endpoint_url" not in fsspec.config.conf.get("s3", {})
    cli(
        "run",
        f"s3://{BUCKET}/in/scan.nii.gz",
        "--hypothalamus",
        f"s3://{BUCKET}/in/hypothalamus.nii.gz",
        "--out",
        f"s3://{BUCKET}/out3",
        "--until",
        "preprocess",
        "--workers",
        "1",
        "--threads-per-worker",
        "2",
        "--spacing",
        "2.5",
        "--no-qc",
        "--quiet",
        "--storage-options",
        f"@{tmp_path / 's3.json'}",
    )
    for name in ("preprocessed", "mask", "bias", "hypothalamus"):
        _, d_r, _ = _nifti_parts(cat(s3, f"out3/scan/{name}.nii.gz"))
        _, d_l, _ = _nifti_parts((local_run / f"{name}.nii.gz").read_bytes())
        assert d_r == d_l, name
    # the secret is in no object written (JSON, metadata, NIfTI header extensions)
    for key in ls(s3, "out3"):
        if key.endswith((".json", ".txt")):
            assert secret.encode() not in cat(s3, key), key
        elif key.endswith(".nii.gz"):
            assert secret.encode() not in gzip.decompress(cat(s3, key))[: 1 << 16], key
    assert read_nifti_provenance(f"s3://{BUCKET}/out3/scan/mask.nii.gz", storage_options=so)["stage_key"]


def test_location_helpers():
    import doctest

    from helm_dask.io import location

    assert doctest.testmod(location).failed == 0
    assert location.join("s3://b/out", "sub", "helm.zarr") == "s3://b/out/sub/helm.zarr"
    assert location.parent("s3://b/out/x.nii.gz") == "s3://b/out" and location.name("s3://b/o/x.zarr/") == "x.zarr"
    assert location.absolute("s3://b/k") == "s3://b/k" and location.absolute("rel") == os.path.abspath("rel")
    assert location.sibling("s3://b/o/x.nii", ".thin", ".zarr").startswith("s3://b/o/.x.nii.thin-")
    with location.use_storage_options({"anon": True}):
        assert location.options_for() == {"anon": True} and location.options_for({}) == {}
    assert location.options_for() == {}
    assert location.parse_storage_options(None) is None
