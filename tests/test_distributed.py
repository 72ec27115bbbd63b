"""Runs on real ``dask scheduler`` / ``dask worker`` processes (loopback only): identical outputs, failures, TLS.

Every run goes through the CLI in a subprocess (``helm-dask run ... --scheduler ADDR``), exactly as a user would,
and is compared file by file with one LocalCluster run of the same small phantom (the reference): every NIfTI
export and every Zarr chunk file byte for byte, the fitted-model JSON files too (they carry no times).

- a real scheduler with two single-threaded worker processes: identical outputs;
- a worker process (not its nanny) SIGKILLed in the middle of the bias stage: the run completes, identical;
- the client SIGKILLed in the middle of the bias stage: no final output of that stage exists, only temporary
  names; the rerun reuses the finished stages, completes and is identical;
- TLS: CA and certificates generated here; a run with ``--tls-*`` succeeds and is identical; without the
  certificates (tls:// or tcp:// address) the CLI exits non-zero within seconds with one line, no traceback; a
  Dask config file (``DASK_CONFIG``) enables TLS without any flag.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helm_dask.cluster import ClusterOptions, scheduler_address, security_from_options
from helm_dask.errors import HelmError

BIN = Path(sys.executable).parent
HELM = [sys.executable, "-m", "helm_dask.cli"]
SPACING_IN = 2.0  # mm: a tiny phantom (~50^3 voxels); the method is resolution-independent
SPACING_WORK = 2.5  # at this spacing the bias stage lasts several seconds: time to kill something midway
KILL_STAGE = "bias"
KILL_OUTPUTS = ("bias", "preprocessed")  # the stage's volumes in helm.zarr
RUN_TIMEOUT = 240  # s, per CLI run: a hung run fails the test instead of the suite
CHUNKS = "32"  # several chunks per volume: tasks spread over both workers, many chunk files compared
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def run_args(phantom: Path, out: Path, *extra) -> list[str]:
    return [
        *HELM,
        "run",
        str(phantom / "scan.nii.gz"),
        "--hypothalamus",
        str(phantom / "hypothalamus.nii.gz"),
        "--out",
        str(out),
        "--subject",
        "ph",
        "--spacing",
        str(SPACING_WORK),
        "--k",
        "4-5",
        "--no-qc",
        "--chunks",
        CHUNKS,
        *map(str, extra),
    ]


def helm(args, *, env=None, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env or ENV, timeout=timeout)


def run_until(args, trigger: str, *, timeout=RUN_TIMEOUT):
    """Start a CLI run and return (process, output so far) once a line containing ``trigger`` was printed."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True
    )
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if trigger in line:
            return proc, seen
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the run never printed {trigger!r}:\n{''.join(seen)}")


def finish(proc, seen, timeout=RUN_TIMEOUT) -> tuple[int, str]:
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return proc.returncode, "".join(seen) + (rest or "")


def check_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outputs(ref: Path, got: Path) -> int:
    """Every NIfTI, JSON model file, LUT and Zarr file of subject ``ph`` identical; returns the files compared."""
    a, b = ref / "ph", got / "ph"
    n = 0
    niftis = sorted(p.name for p in a.glob("*.nii.gz"))
    assert len(niftis) >= 10 and niftis == sorted(p.name for p in b.glob("*.nii.gz"))
    for name in niftis + ["bias_model.json", "kmeans.json", "transform.json", "lut.txt"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        n += 1
    # Zarr: chunk files byte for byte; metadata with the output folder's own name replaced (it records its
    # source store's path). Hidden top-level entries are temporaries of interrupted writes: never compared.
    za, zb = a / "helm.zarr", b / "helm.zarr"
    vols = sorted(p.name for p in za.iterdir() if not p.name.startswith("."))
    assert vols == sorted(p.name for p in zb.iterdir() if not p.name.startswith("."))
    for vol in vols:
        fa, fb = tree(za / vol), tree(zb / vol)
        assert sorted(fa) == sorted(fb), vol
        for rel in fa:
            if rel.endswith("zarr.json"):
                ta = fa[rel].read_text().replace(str(ref), "OUT")
                tb = fb[rel].read_text().replace(str(got), "OUT")
                assert json.loads(ta) == json.loads(tb), f"{vol}/{rel}"
            else:
                assert fa[rel].read_bytes() == fb[rel].read_bytes(), f"{vol}/{rel}"
            n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# TLS material


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and scheduler/worker/client certificates for 127.0.0.1 and localhost (SAN); returns the PEM paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))
    paths = {}

    def write(name, key, cert):
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_cert"] = folder / f"{name}.pem"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def builder(subject, issuer, public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"])
            .not_valid_after(valid["not_valid_after"])
        )

    def ca_cert(name):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca = ca_cert("helm-dask test CA")
    write("ca", ca_key, ca)
    for role in ("scheduler", "worker", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"helm-dask {role}")]), ca.subject, key.public_key()
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(role, key, cert)
    other_key, other = ca_cert("some other CA")  # signs nothing of this cluster: a wrong --tls-ca
    write("other_ca", other_key, other)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# clusters started by the test


class Cluster:
    """A ``dask scheduler`` and two ``dask worker`` processes (nanny + worker each) on 127.0.0.1."""

    def __init__(self, folder: Path, tls: dict | None = None):
        self.folder = folder
        self.sched_file = folder / "scheduler.json"
        self.tls = tls
        self.procs: list[subprocess.Popen] = []
        self.logs = []

    def _tls_flags(self, role):
        if not self.tls:
            return []
        return [
            "--tls-ca-file",
            self.tls["ca_cert"],
            "--tls-cert",
            self.tls[f"{role}_cert"],
            "--tls-key",
            self.tls[f"{role}_key"],
        ]

    def _spawn(self, name, args):
        log = open(self.folder / f"{name}.log", "w")
        self.logs.append(log)
        # own session: the finalizer can kill the process and anything it started (the worker under a nanny)
        self.procs.append(
            subprocess.Popen(
                [str(a) for a in args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                env=ENV,
                start_new_session=True,
            )
        )

    def start(self) -> Cluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        proto = ["--protocol", "tls"] if self.tls else []
        self._spawn(
            "scheduler",
            [
                BIN / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *proto,
                "--scheduler-file",
                self.sched_file,
                "--no-dashboard",
                *self._tls_flags("scheduler"),
            ],
        )
        deadline = time.monotonic() + 60
        while not self.sched_file.exists() or not self.sched_file.read_text().strip().endswith("}"):
            assert time.monotonic() < deadline, (self.folder / "scheduler.log").read_text()
            assert self.procs[0].poll() is None, (self.folder / "scheduler.log").read_text()
            time.sleep(0.2)
        for i in range(2):
            self._spawn(
                f"worker{i}",
                [
                    BIN / "dask",
                    "worker",
                    "--scheduler-file",
                    self.sched_file,
                    "--nworkers",
                    1,
                    "--nthreads",
                    1,
                    "--memory-limit",
                    "1GB",
                    "--no-dashboard",
                    "--local-directory",
                    self.folder / f"w{i}",
                    *self._tls_flags("worker"),
                ],
            )
        with self.client() as c:
            c.wait_for_workers(2, timeout=90)
        return self

    @property
    def address(self) -> str:
        return json.loads(self.sched_file.read_text())["address"]

    def client(self):
        from distributed import Client

        kw = {}
        if self.tls:
            from distributed.security import Security

            kw["security"] = Security(
                tls_ca_file=str(self.tls["ca_cert"]),
                tls_client_cert=str(self.tls["client_cert"]),
                tls_client_key=str(self.tls["client_key"]),
                require_encryption=True,
            )
        return Client(self.address, timeout="30s", **kw)

    def worker_pids(self) -> dict[str, int]:
        with self.client() as c:
            c.wait_for_workers(2, timeout=90)
            return c.run(os.getpid)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from helm_dask.phantom_io import write_phantom

    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root, spacing_mm=SPACING_IN, side="L", seed=1)
    return root


@pytest.fixture(scope="module")
def reference(phantom, tmp_path_factory):
    """The LocalCluster run (the default path, two worker processes) every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    res = helm(run_args(phantom, out, "--workers", 2, "--threads-per-worker", 1))
    check_ok(res)
    assert "dask: 2 worker(s)" in res.stderr and "dashboard http://127.0.0.1:" in res.stderr
    return out


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tcp-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs):
    cluster = Cluster(tmp_path_factory.mktemp("tls-cluster"), tls=certs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    err = res.stderr.strip()
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("helm-dask: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# a. a real scheduler and two workers


@pytest.mark.e2e
@pytest.mark.slow
def test_real_cluster_gives_identical_outputs(phantom, reference, tcp_cluster, tmp_path):
    assert tcp_cluster.address.startswith("tcp://127.0.0.1:")
    res = helm(run_args(phantom, tmp_path, "--scheduler", tcp_cluster.sched_file))  # via the scheduler file
    check_ok(res)
    assert f"dask: 2 worker(s), 2 thread(s) at {tcp_cluster.address}; dashboard " in res.stderr
    n = assert_same_outputs(reference, tmp_path)
    assert n > 100  # ~15 volumes x (levels + chunks): the comparison really covered the Zarr trees


# ----------------------------------------------------------------------------------------------------------------
# b. a worker killed midway through a stage


@pytest.mark.e2e
@pytest.mark.slow
def test_worker_killed_midway_changes_nothing(phantom, reference, tcp_cluster, tmp_path):
    before = tcp_cluster.worker_pids()
    proc, seen = run_until(run_args(phantom, tmp_path, "--scheduler", tcp_cluster.address), f"{KILL_STAGE}: computing")
    victim_addr, victim = sorted(before.items())[0]
    # into the stage: wait until the victim is running (or holds) tasks of it -- not a fixed sleep, which a fast
    # machine outruns -- then kill the worker process itself, not its nanny
    with tcp_cluster.client() as c:
        deadline = time.monotonic() + 60
        while not (c.processing().get(victim_addr) or c.has_what().get(victim_addr)):
            assert time.monotonic() < deadline and proc.poll() is None, "the stage never reached the victim"
            time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    stage_done_at_kill = [o for o in KILL_OUTPUTS if (tmp_path / "ph" / "helm.zarr" / o).exists()]
    code, text = finish(proc, seen)
    assert code == 0, text
    assert not stage_done_at_kill, f"the kill came too late: {stage_done_at_kill} already written"
    assert f"{KILL_STAGE}: done" in text
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    after = tcp_cluster.worker_pids()  # the nanny restarted a worker: two again, one new process
    assert victim not in after.values() and len(after) == 2
    assert_same_outputs(reference, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# c. the client killed midway through a stage


@pytest.mark.e2e
@pytest.mark.slow
def test_client_killed_midway_leaves_no_final_output_and_resumes(phantom, reference, tcp_cluster, tmp_path):
    args = run_args(phantom, tmp_path, "--scheduler", tcp_cluster.address)
    proc, seen = run_until(args, f"{KILL_STAGE}: computing")
    with tcp_cluster.client() as c:  # wait until the stage's tasks run (a fixed sleep loses on a fast machine)
        deadline = time.monotonic() + 60
        while not any(c.processing().values()):
            assert time.monotonic() < deadline and proc.poll() is None, "the stage never started its tasks"
            time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: as a power cut or `kill -9` would do
    code, text = finish(proc, seen)
    assert code == -signal.SIGKILL and f"{KILL_STAGE}: done" not in text, text
    subj = tmp_path / "ph"
    store = subj / "helm.zarr"
    for o in KILL_OUTPUTS:
        assert not (store / o).exists(), o
    for f in ("preprocessed.nii.gz", "bias.nii.gz", "mask.nii.gz", "run.json"):
        assert not (subj / f).exists(), f
    # whatever exists under a final name is finished (earlier stages); the rest has a temporary name
    from helm_dask.io.store import is_complete

    finals = [p for p in store.iterdir() if not p.name.startswith(".") and p.name != "zarr.json"]  # (the group's)
    assert {p.name for p in finals} >= {"scan_raw", "labels_raw", "mask_ras"}
    assert all(is_complete(str(p)) for p in finals)
    assert all(".tmp-" in p.name for p in store.iterdir() if p.name.startswith("."))
    for p in subj.iterdir():
        assert p.name.startswith(".") or p.name == "helm.zarr" or p.suffix == ".json", p
    res = helm(args)
    check_ok(res)
    for stage in ("import", "background", "resample"):
        assert f"[ph] {stage}: up to date, nothing to do" in res.stdout, res.stdout
    assert f"[ph] {KILL_STAGE}: computing" in res.stdout
    info = json.loads((subj / "run.json").read_text())
    assert {s: v["status"] for s, v in info["stages"].items()} == {
        "import": "skipped",
        "background": "skipped",
        "resample": "skipped",
        "bias": "computed",
        "kmeans": "computed",
        "merge": "computed",
        "mirror": "computed",
    }
    assert_same_outputs(reference, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# d. TLS


@pytest.mark.e2e
@pytest.mark.slow
def test_tls_run_succeeds_and_matches(phantom, reference, tls_cluster, certs, tmp_path):
    addr = tls_cluster.address
    assert addr.startswith("tls://127.0.0.1:")
    with tls_cluster.client() as c:
        assert all(w.startswith("tls://") for w in c.scheduler_info()["workers"])
    res = helm(
        run_args(
            phantom,
            tmp_path,
            "--scheduler",
            addr,
            "--tls-ca",
            certs["ca_cert"],
            "--tls-cert",
            certs["client_cert"],
            "--tls-key",
            certs["client_key"],
        )
    )
    check_ok(res)
    assert f"at {addr};" in res.stderr
    assert_same_outputs(reference, tmp_path)


REFUSALS = """
import contextlib, io, json, sys
from helm_dask.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_tls_scheduler_refuses_clients_without_certificates(phantom, tls_cluster, certs, tmp_path):
    addr = tls_cluster.address
    port = addr.rsplit(":", 1)[1]
    res = helm(run_args(phantom, tmp_path / "a", "--scheduler", addr), timeout=60)
    assert_one_line_error(res, addr, "requires TLS", "--tls-ca/--tls-cert/--tls-key")
    # More ways of getting it wrong, in one process (saves interpreter start-ups): each one line, exit 2.
    ca, cert, key = (str(certs[k]) for k in ("ca_cert", "client_cert", "client_key"))
    cases = {
        "scheduler file -> the same tls:// address": (
            ["--scheduler", str(tls_cluster.sched_file)],
            [addr, "requires TLS"],
        ),
        "plain TCP to the TLS port": (
            ["--scheduler", f"tcp://127.0.0.1:{port}"],
            [f"tcp://127.0.0.1:{port}", "refused the connection", "requires TLS", f"tls://127.0.0.1:{port}"],
        ),
        "certificates of another CA": (
            [
                "--scheduler",
                addr,
                "--tls-ca",
                str(certs["other_ca_cert"]),
                "--tls-cert",
                str(certs["other_ca_cert"]),
                "--tls-key",
                str(certs["other_ca_key"]),
            ],
            [addr, "TLS handshake", "failed", "--tls-ca"],
        ),
        "TLS flags with a tcp:// address": (
            ["--scheduler", f"tcp://127.0.0.1:{port}", "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key],
            ["is not tls://"],
        ),
    }
    argv = [
        [str(a) for a in run_args(phantom, tmp_path / f"x{i}", *extra)[len(HELM) :]]
        for i, (extra, _) in enumerate(cases.values())
    ]
    res = helm([sys.executable, "-c", REFUSALS, json.dumps(argv)], timeout=120)
    check_ok(res)
    for (name, (_, fragments)), (code, err) in zip(cases.items(), json.loads(res.stdout.splitlines()[-1])):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("helm-dask: error: "), (name, err)
        assert all(f in lines[0] for f in fragments), (name, lines[0])
    assert "Traceback" not in res.stdout + res.stderr
    assert not any(p.name.startswith(("a", "x")) for p in tmp_path.iterdir())  # nothing was written


@pytest.mark.slow
def test_tls_from_a_dask_config_file_without_flags(tls_cluster, certs, tmp_path):
    """``DASK_CONFIG`` with distributed.comm.tls.* replaces the flags (checked with a small ``convert``)."""
    import yaml

    cfg = tmp_path / "dask.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "distributed": {
                    "comm": {
                        "require-encryption": True,
                        "tls": {
                            "ca-file": str(certs["ca_cert"]),
                            "client": {"cert": str(certs["client_cert"]), "key": str(certs["client_key"])},
                        },
                    }
                }
            }
        )
    )
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), tmp_path / "a.nii.gz")
    env = dict(ENV, DASK_CONFIG=str(cfg))
    res = helm(
        [
            *HELM,
            "convert",
            str(tmp_path / "a.nii.gz"),
            str(tmp_path / "a.zarr"),
            "--scheduler",
            tls_cluster.address,
            "--chunks",
            "4",
        ],
        env=env,
        timeout=120,
    )
    check_ok(res)
    assert f"at {tls_cluster.address};" in res.stderr
    from helm_dask.io.store import open_volume

    np.testing.assert_array_equal(np.asarray(open_volume(str(tmp_path / "a.zarr"))), data)


# ----------------------------------------------------------------------------------------------------------------
# options without a cluster (fast)


def test_option_errors_and_scheduler_file(tmp_path, certs):
    assert security_from_options(ClusterOptions()) is None
    with pytest.raises(HelmError, match="--tls-ca and --tls-cert"):
        security_from_options(ClusterOptions(tls_cert=str(certs["client_cert"])))
    with pytest.raises(HelmError, match="--tls-key file not found"):
        security_from_options(
            ClusterOptions(
                tls_ca=str(certs["ca_cert"]), tls_cert=str(certs["client_cert"]), tls_key=str(tmp_path / "missing.key")
            )
        )
    with pytest.raises(HelmError, match="cannot load the TLS files"):  # a key that does not match the cert
        security_from_options(
            ClusterOptions(
                tls_ca=str(certs["ca_cert"]), tls_cert=str(certs["client_cert"]), tls_key=str(certs["worker_key"])
            )
        )
    sec = security_from_options(
        ClusterOptions(
            tls_ca=str(certs["ca_cert"]), tls_cert=str(certs["client_cert"]), tls_key=str(certs["client_key"])
        )
    )
    assert sec.require_encryption and sec.tls_client_cert == str(certs["client_cert"])
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"type": "Scheduler", "address": "tls://127.0.0.1:8786"}))
    assert scheduler_address(str(f)) == "tls://127.0.0.1:8786"
    f.write_text("not json")
    with pytest.raises(HelmError, match="not a Dask scheduler file"):
        scheduler_address(str(f))
    with pytest.raises(HelmError, match="scheduler file not found"):
        scheduler_address(str(tmp_path / "nope.json"))
    assert scheduler_address("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"


def test_cli_help_and_defaults():
    from helm_dask.cli import _cluster_opts, build_parser

    parser = build_parser()
    args = parser.parse_args(["run", "s.nii.gz", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "c.key"])
    opts = _cluster_opts(args)
    assert (opts.tls_ca, opts.tls_cert, opts.tls_key) == ("ca.pem", "c.pem", "c.key")
    assert opts.dashboard.startswith("127.0.0.1:")  # the dashboard stays on localhost unless asked
    for command in ("run", "convert", "phantom", "compare", "demo"):
        sub = parser._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        assert "--tls-ca" in text and "--tls-key" in text and "DASK_CONFIG" in text, command
