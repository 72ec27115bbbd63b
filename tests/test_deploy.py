"""The deployment recipes in deploy/: docker compose, Kubernetes (dask-kubernetes operator, Dask Helm chart), SLURM.

Nothing here starts a container, a pod or a batch job. What is checked:

- every YAML file parses with ``yaml.safe_load``;
- command lines are parsed by the real parsers: ``dask worker`` / ``dask scheduler`` (distributed's click
  commands, with the installed distributed) and ``helm-dask run`` (helm-dask's argparse parser);
- Kubernetes manifests against the Kubernetes JSON schemas shipped by ``kubernetes-validate`` (offline, strict:
  unknown fields fail); the operator's ``DaskCluster`` / ``DaskJob`` against the CRD structure of
  dask-kubernetes (``templates.yaml``: required ``scheduler.spec``, ``scheduler.service``, ``worker.spec``,
  ``job``, ``cluster``) with their pod/service specs checked as ``PodSpec`` / ``ServiceSpec``;
- the dask-jobqueue configuration by building ``SLURMCluster(...).job_script()`` from it.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import dask
import pytest
import yaml
from dask.utils import parse_bytes, parse_timedelta

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = "helm-dask:0.1.0"
SHARED = "/data"

EXPECTED_YAML = [
    "manifest.example.yaml",
    "docker/docker-compose.yml",
    "kubernetes/pvc.yaml",
    "kubernetes/daskcluster.yaml",
    "kubernetes/daskjob.yaml",
    "kubernetes/toolbox.yaml",
    "kubernetes/helm-values.yaml",
    "slurm/jobqueue.yaml",
]


def load(rel: str):
    return yaml.safe_load((DEPLOY / rel).read_text())


# ----------------------------------------------------------------------------------------------------------------
# Parsers of the command lines the recipes run


def parse_dask(cmd: list[str]) -> dict:
    """Parse ``dask worker ...`` / ``dask scheduler ...`` (or the ``dask-worker`` shim) with distributed's CLI."""
    from distributed.cli import dask_scheduler, dask_worker

    cmd = [str(c) for c in cmd]
    if cmd[0] in ("dask-worker", "dask-scheduler"):
        cmd = ["dask", cmd[0].split("-")[1], *cmd[1:]]
    assert cmd[0] == "dask" and cmd[1] in ("worker", "scheduler"), cmd
    main = {"worker": dask_worker.main, "scheduler": dask_scheduler.main}[cmd[1]]
    params = main.make_context(f"dask {cmd[1]}", cmd[2:]).params
    # distributed passes unknown options on to --preload modules: a misspelt flag would land there silently
    assert not params.get("preload_argv"), f"unknown options {params['preload_argv']} in {cmd}"
    return params


def parse_helm(cmd: list[str]):
    from helm_dask.cli import build_parser

    assert cmd[0] == "helm-dask", cmd
    return build_parser().parse_args([str(c) for c in cmd[1:]])


def compose_defaults(value):
    """Resolve compose's ``${VAR:-default}`` the way ``docker compose`` does with VAR unset."""
    if isinstance(value, list):
        return [compose_defaults(v) for v in value]
    if not isinstance(value, str):
        return value
    assert not re.search(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", value), f"{value!r}: variable without a default"
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def test_parsers_reject_bad_command_lines():
    # the checks below rely on these parsers failing on typos
    import click

    with pytest.raises(click.UsageError):
        parse_dask(["dask", "worker", "tcp://s:8786", "--no-dashbord"])
    with pytest.raises(click.UsageError):
        parse_dask(["dask", "worker", "tcp://s:8786", "--nthread", "2"])
    with pytest.raises(click.UsageError):
        parse_dask(["dask", "scheduler", "--dashboard-adress", ":8787"])
    with pytest.raises(SystemExit):
        parse_helm(["helm-dask", "run", "m.yaml", "--schedulr", "tcp://s:8786"])
    assert compose_defaults("${X:-4GB}") == "4GB"
    with pytest.raises(AssertionError):
        compose_defaults("${X}")


# ----------------------------------------------------------------------------------------------------------------
# All files


def test_every_yaml_parses():
    found = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml"))
    assert set(EXPECTED_YAML) <= set(found), set(EXPECTED_YAML) - set(found)
    for rel in found:
        docs = [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]
        assert len(docs) == 1 and isinstance(docs[0], dict), rel


@pytest.mark.parametrize("rel", ["README.md", "docker/README.md", "kubernetes/README.md", "slurm/README.md"])
def test_readmes_say_how_to_start_connect_and_size(rel):
    text = " ".join((DEPLOY / rel).read_text().split())
    assert "--scheduler" in text  # how to point helm-dask at the cluster
    assert "0.1 mm" in text  # sizing
    assert "s3://" in text  # object stores: how to use them


def test_example_manifest_is_a_valid_helm_dask_manifest():
    from helm_dask.batch import load_manifest, subject_params
    from helm_dask.phantom_io import PHANTOM_FILES
    from helm_dask.pipeline import RunParams

    path = DEPLOY / "manifest.example.yaml"
    shared, subjects = load_manifest(path)
    base = RunParams(scan="", hypothalamus="", out="/tmp/out")
    params = [subject_params(base, shared, s) for s in subjects]
    assert [p.side for p in params] == ["L", "R"]
    assert all(p.spacing == 0.3 and p.ks == (4, 5, 6, 7, 8, 9) for p in params)
    # it points at what `helm-dask phantom FOLDER` writes
    for p in params:
        assert Path(p.scan).name == "scan.nii.gz" and Path(p.hypothalamus).name == "hypothalamus.nii.gz"
        assert Path(p.scan).parent.parent == path.parent
    assert {"scan", "hypothalamus"} <= set(PHANTOM_FILES)


# ----------------------------------------------------------------------------------------------------------------
# Docker


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):  # comment inside a continued instruction
            continue
        buf += " " + s
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        op, _, rest = buf.strip().partition(" ")
        lines.append((op.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return lines


def test_dockerfile_installs_the_package():
    ins = dockerfile_instructions((DEPLOY / "docker" / "Dockerfile").read_text())
    ops = [op for op, _ in ins]
    # no ENTRYPOINT: compose `command:` and Kubernetes `args:` are the whole command line
    assert set(ops) <= {"FROM", "ARG", "ENV", "COPY", "RUN", "USER", "WORKDIR", "EXPOSE", "CMD", "LABEL"}, ops
    first = next(i for i, op in enumerate(ops) if op != "ARG")
    assert ops[first] == "FROM" and ops.count("FROM") == 1
    base = ins[first][1]
    m = re.match(r"python:(\d+)\.(\d+)", base)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    need = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups())
    assert m and tuple(map(int, m.groups())) >= need, base

    copies = [rest.split() for op, rest in ins if op == "COPY"]
    sources = [src for args in copies for src in args[:-1] if not src.startswith("--")]
    for src in sources:  # the build context is the repository root (compose: context ../..)
        assert (ROOT / src).exists(), src
    # what `pip install /src` needs: pyproject, its readme, the package
    for needed in ("pyproject.toml", pyproject["project"]["readme"], "helm_dask"):
        assert needed in sources, needed
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"pip install /src\b", runs)
    assert "bokeh" in runs  # the dashboard
    # the Dask Helm chart starts `dask-scheduler` / `dask-worker`
    assert "/usr/local/bin/dask-scheduler" in runs and "/usr/local/bin/dask-worker" in runs
    assert re.search(r'exec dask scheduler "\$@"', runs) and re.search(r'exec dask worker "\$@"', runs)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")

    # BuildKit's per-Dockerfile ignore file must let every COPY source through
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].strip() for line in ignore if line.startswith("!")}
    for src in sources:
        assert src in allowed, f"{src} is excluded from the build context"


COMPOSE_SCHEDULER = "tcp://scheduler:8786"


@pytest.fixture(scope="module")
def compose():
    return load("docker/docker-compose.yml")


def test_compose_services_share_one_image_built_from_the_repo(compose):
    services = compose["services"]
    assert {"scheduler", "worker", "jupyter", "helm"} <= set(services)
    for name, svc in services.items():
        assert svc["image"] == IMAGE, name
        build = svc["build"]
        assert (DEPLOY / "docker" / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == (DEPLOY / "docker" / "Dockerfile").resolve()


def test_compose_scheduler(compose):
    svc = compose["services"]["scheduler"]
    p = parse_dask(compose_defaults(svc["command"]))
    assert f"tcp://scheduler:{p['port']}" == COMPOSE_SCHEDULER
    dash = p["dashboard_address"].rsplit(":", 1)[1]
    assert f"127.0.0.1:{dash}:{dash}" in svc["ports"]  # dashboard published on localhost only
    assert not any(str(port).endswith(":8786") for port in svc["ports"])
    assert "8787/health" in " ".join(svc["healthcheck"]["test"])


def test_compose_workers(compose):
    svc = compose["services"]["worker"]
    p = parse_dask(compose_defaults(svc["command"]))
    assert p["scheduler"] == COMPOSE_SCHEDULER
    assert p["n_workers"] == "1" and p["nthreads"] == 2
    assert 2e9 <= parse_bytes(p["memory_limit"]) <= 4 * 2**30  # the 0.1 mm budget: 2-4 GB per worker
    assert not p["local_directory"].startswith(SHARED)  # spill stays off the shared volume
    assert svc["deploy"]["replicas"] >= 1
    assert svc["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_compose_shared_volume(compose):
    assert "helm-data" in compose["volumes"]
    for name in ("worker", "jupyter", "helm"):
        assert f"helm-data:{SHARED}" in compose["services"][name]["volumes"], name


def test_compose_helm_one_shot_runs_the_manifest_on_the_cluster(compose):
    svc = compose["services"]["helm"]
    cmd = svc["command"]
    assert cmd[0] == "helm-dask" and cmd[1] == "run"
    args = parse_helm(cmd)
    assert args.scheduler == COMPOSE_SCHEDULER
    assert args.scan.startswith(SHARED + "/") and args.scan.endswith((".yaml", ".yml", ".csv"))
    assert args.out.startswith(SHARED + "/")
    assert svc["profiles"]  # `docker compose up` does not start it; `docker compose run --rm helm` does
    assert svc["restart"] == "no"


def test_compose_jupyter(compose):
    svc = compose["services"]["jupyter"]
    assert svc["command"][:2] == ["jupyter", "lab"]
    assert svc["environment"]["DASK_SCHEDULER_ADDRESS"] == COMPOSE_SCHEDULER
    assert "127.0.0.1:8888:8888" in svc["ports"]


# ----------------------------------------------------------------------------------------------------------------
# Kubernetes

K8S = ["pvc.yaml", "daskcluster.yaml", "daskjob.yaml", "toolbox.yaml"]


@pytest.fixture(scope="module")
def k8s():
    return {name: load(f"kubernetes/{name}") for name in K8S}


@pytest.mark.parametrize("name", K8S)
def test_k8s_manifest_header(k8s, name):
    doc = k8s[name]
    assert isinstance(doc["apiVersion"], str) and isinstance(doc["kind"], str)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1123 label
    assert isinstance(doc["spec"], dict)


def containers_of(pod_spec):
    cs = pod_spec["containers"]
    assert cs, "no containers"
    for c in cs:
        assert c["image"] == IMAGE, c["name"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]
    return cs


def shared_claim_mounted(pod_spec, claim) -> bool:
    vols = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for c in pod_spec["containers"]:
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"], {})
            if m["mountPath"] == SHARED and v.get("persistentVolumeClaim", {}).get("claimName") == claim:
                return True
    return False


def check_dask_cluster_spec(spec, cluster_name, claim):
    """The DaskCluster spec: scheduler pod + service, worker pods; the things the operator relies on."""
    sched = spec["scheduler"]
    (sc,) = containers_of(sched["spec"])
    p = parse_dask(sc["args"])
    ports = {port["name"]: port["containerPort"] for port in sc["ports"]}
    assert ports["tcp-comm"] == int(p["port"]) == 8786
    svc = sched["service"]
    # the operator names the cluster after the resource; the Service must select its scheduler pod
    assert svc["selector"] == {"dask.org/cluster-name": cluster_name, "dask.org/component": "scheduler"}
    assert {sp["port"] for sp in svc["ports"]} >= {8786}
    assert {sp["targetPort"] for sp in svc["ports"]} <= set(ports)

    worker = spec["worker"]
    assert isinstance(worker["replicas"], int) and worker["replicas"] >= 1
    (wc,) = containers_of(worker["spec"])
    p = parse_dask(wc["args"])
    assert p["scheduler"] is None  # the operator sets DASK_SCHEDULER_ADDRESS
    assert p["name"] == "$(DASK_WORKER_NAME)"
    limits = wc["resources"]["limits"]
    assert p["nthreads"] <= int(limits["cpu"])
    assert 2e9 <= parse_bytes(p["memory_limit"]) < parse_bytes(limits["memory"])  # headroom for the nanny
    assert shared_claim_mounted(worker["spec"], claim)
    mounts = {m["mountPath"]: m["name"] for m in wc["volumeMounts"]}
    vols = {v["name"]: v for v in worker["spec"]["volumes"]}
    assert "emptyDir" in vols[mounts[p["local_directory"]]]  # spill on node-local disk


def test_daskcluster(k8s):
    doc = k8s["daskcluster.yaml"]
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    check_dask_cluster_spec(doc["spec"], doc["metadata"]["name"], k8s["pvc.yaml"]["metadata"]["name"])


def test_daskjob(k8s):
    doc = k8s["daskjob.yaml"]
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskJob")
    assert set(doc["spec"]) == {"job", "cluster"}
    claim = k8s["pvc.yaml"]["metadata"]["name"]
    check_dask_cluster_spec(doc["spec"]["cluster"]["spec"], doc["metadata"]["name"], claim)
    job = doc["spec"]["job"]["spec"]
    assert job["restartPolicy"] == "Never"
    (jc,) = containers_of(job)
    args = parse_helm(jc["args"])
    assert args.command == "run" and args.scheduler == "$(DASK_SCHEDULER_ADDRESS)"  # injected by the operator
    assert args.scan.startswith(SHARED + "/") and args.out.startswith(SHARED + "/")
    assert shared_claim_mounted(job, claim)


def test_pvc_and_toolbox(k8s):
    pvc = k8s["pvc.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # workers on several nodes
    pod = k8s["toolbox.yaml"]
    assert pod["kind"] == "Pod"
    containers_of(pod["spec"])
    assert shared_claim_mounted(pod["spec"], pvc["metadata"]["name"])


def test_both_kubernetes_paths_expose_the_same_scheduler_address(k8s):
    values = load("kubernetes/helm-values.yaml")
    service = f"{k8s['daskcluster.yaml']['metadata']['name']}-scheduler"
    assert service == f"{values['fullnameOverride']}-scheduler"
    for rel in ("kubernetes/README.md", "kubernetes/toolbox.yaml", "kubernetes/daskcluster.yaml"):
        assert f"tcp://{service}:8786" in (DEPLOY / rel).read_text(), rel


# -- schemas (kubernetes-validate: Kubernetes' OpenAPI as JSON schema, bundled, offline) -------------------------

POD_SPEC = {"$ref": "/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodSpec"}
SERVICE_SPEC = {"$ref": "/api/_definitions.json#/$defs/io.k8s.api.core.v1.ServiceSpec"}
SIMPLE_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
# dask-kubernetes operator CRDs (dask_kubernetes/operator/customresources/templates.yaml, daskjob.yaml)
DASK_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["scheduler", "worker"],
    "properties": {
        "idleTimeout": {"type": "integer"},
        "scheduler": {
            "type": "object",
            "additionalProperties": False,
            "required": ["spec", "service"],
            "properties": {"metadata": SIMPLE_META, "spec": POD_SPEC, "service": SERVICE_SPEC},
        },
        "worker": {
            "type": "object",
            "additionalProperties": False,
            "required": ["spec"],
            "properties": {"replicas": {"type": "integer"}, "metadata": SIMPLE_META, "spec": POD_SPEC},
        },
    },
}
OBJECT_META = {"$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
CRD_SCHEMAS = {
    "DaskCluster": {
        "$id": "https://kubernetes.io/api/daskcluster.json",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kubernetes.dask.org/v1"},
            "kind": {"const": "DaskCluster"},
            "metadata": OBJECT_META,
            "spec": DASK_CLUSTER_SPEC,
        },
    },
    "DaskJob": {
        "$id": "https://kubernetes.io/api/daskjob.json",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kubernetes.dask.org/v1"},
            "kind": {"const": "DaskJob"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["cluster", "job"],
                "properties": {
                    "job": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["spec"],
                        "properties": {"metadata": SIMPLE_META, "spec": POD_SPEC},
                    },
                    "cluster": {"type": "object", "required": ["spec"], "properties": {"spec": DASK_CLUSTER_SPEC}},
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def k8s_schema():
    """``validate(doc_or_fragment, schema_or_kind)`` against Kubernetes' strict JSON schemas."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    version = utils.latest_version()
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    defs = Resource.from_contents(utils.schema_contents(f"{folder}/_definitions.json", version))
    registry = defs @ Registry()

    def validate(doc, schema=None):
        if schema is None:
            if doc["kind"] in CRD_SCHEMAS:
                schema = CRD_SCHEMAS[doc["kind"]]
            else:  # a built-in kind: kubernetes-validate's own check (strict)
                kv.validate(doc, version, strict=True)
                return
        elif isinstance(schema, str):  # a definition name, e.g. io.k8s.api.core.v1.Volume
            schema = {
                "$id": "https://kubernetes.io/api/fragment.json",
                "$ref": f"/api/_definitions.json#/$defs/{schema}",
            }
        jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)

    validate.error = jsonschema.ValidationError
    return validate


@pytest.mark.parametrize("name", K8S)
def test_k8s_manifest_matches_schema(k8s, k8s_schema, name):
    k8s_schema(k8s[name])


@pytest.mark.parametrize("mutate", ["typo", "no-service", "worker-spec-not-a-pod", "no-job"])
def test_k8s_schema_check_catches_mistakes(k8s, k8s_schema, mutate):
    doc = copy.deepcopy(k8s["daskjob.yaml"])
    cluster = doc["spec"]["cluster"]["spec"]
    if mutate == "typo":
        c = cluster["worker"]["spec"]["containers"][0]
        c["volumeMount"] = c.pop("volumeMounts")
    elif mutate == "no-service":
        del cluster["scheduler"]["service"]
    elif mutate == "worker-spec-not-a-pod":
        cluster["worker"]["spec"] = {"image": IMAGE}
    else:
        del doc["spec"]["job"]
    with pytest.raises(k8s_schema.error):
        k8s_schema(doc)
    bad_pvc = copy.deepcopy(k8s["pvc.yaml"])
    bad_pvc["spec"]["accesModes"] = bad_pvc["spec"].pop("accessModes")
    with pytest.raises(Exception):  # noqa: B017 -- kubernetes-validate raises its own types per kind
        k8s_schema(bad_pvc)


# -- Dask Helm chart values ----------------------------------------------------------------------------------------

# The keys of the chart's values.yaml (dask/helm-chart, dask/values.yaml) we may set: a typo would be ignored by
# helm, silently.
CHART_KEYS = {
    None: {"nameOverride", "fullnameOverride", "scheduler", "webUI", "worker", "additional_worker_groups", "jupyter"},
    "scheduler": {
        "name",
        "enabled",
        "image",
        "replicas",
        "serviceType",
        "loadBalancerIP",
        "servicePort",
        "serviceAnnotations",
        "env",
        "extraArgs",
        "resources",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "metrics",
        "livenessProbe",
        "readinessProbe",
    },
    "worker": {
        "name",
        "image",
        "replicas",
        "strategy",
        "custom_scheduler_url",
        "default_resources",
        "env",
        "extraArgs",
        "resources",
        "mounts",
        "annotations",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "port",
        "portDashboard",
        "threads_per_worker",
        "metrics",
        "livenessProbe",
        "readinessProbe",
    },
    "jupyter": {
        "name",
        "enabled",
        "rbac",
        "image",
        "serviceType",
        "servicePort",
        "password",
        "passwordHint",
        "env",
        "command",
        "args",
        "extraConfig",
        "resources",
        "mounts",
        "tolerations",
        "affinity",
        "nodeSelector",
        "securityContext",
        "serviceAccountName",
        "ingress",
        "livenessProbe",
        "readinessProbe",
    },
}
IMAGE_KEYS = {"repository", "tag", "pullPolicy", "pullSecrets", "dask_worker"}


@pytest.fixture(scope="module")
def values():
    return load("kubernetes/helm-values.yaml")


def test_helm_values_use_known_chart_keys_and_our_image(values):
    assert set(values) <= CHART_KEYS[None]
    for section in ("scheduler", "worker", "jupyter"):
        assert set(values[section]) <= CHART_KEYS[section], set(values[section]) - CHART_KEYS[section]
        image = values[section]["image"]
        assert set(image) <= IMAGE_KEYS
        assert f"{image['repository']}:{image['tag']}" == IMAGE, section


def test_helm_values_worker_command_as_the_chart_renders_it(values):
    w, s = values["worker"], values["scheduler"]
    # dask/templates/dask-worker-deployment.yaml
    args = [
        w["image"]["dask_worker"],
        f"{values['fullnameOverride']}-scheduler:{s.get('servicePort', 8786)}",
        "--nthreads",
        str(w["threads_per_worker"]),
        "--memory-limit",
        str(w["resources"]["limits"]["memory"]),
        "--no-dashboard",
        "--dashboard-address",
        "8790",
        *w["extraArgs"],
    ]
    p = parse_dask(args)
    assert p["scheduler"] == "helm-dask-scheduler:8786"
    assert p["nthreads"] == 2 <= int(w["resources"]["limits"]["cpu"])
    # the last --memory-limit (extraArgs) wins: below the container limit
    assert 2e9 <= parse_bytes(p["memory_limit"]) < parse_bytes(w["resources"]["limits"]["memory"])
    mounts = {m["mountPath"]: m["name"] for m in w["mounts"]["volumeMounts"]}
    vols = {v["name"]: v for v in w["mounts"]["volumes"]}
    assert vols[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == load("kubernetes/pvc.yaml")["metadata"]["name"]
    assert "emptyDir" in vols[mounts[p["local_directory"]]]
    j = values["jupyter"]
    assert j["command"][:2] == ["jupyter", "lab"]
    assert {m["mountPath"] for m in j["mounts"]["volumeMounts"]} == {SHARED}
    assert j["rbac"] is False and not j["serviceAccountName"]  # no service account the chart would not create


def test_helm_values_fragments_match_schema(values, k8s_schema):
    for section in ("scheduler", "worker", "jupyter"):
        sec = values[section]
        k8s_schema(sec["resources"], "io.k8s.api.core.v1.ResourceRequirements")
        if "securityContext" in sec:
            k8s_schema(sec["securityContext"], "io.k8s.api.core.v1.PodSecurityContext")
        for v in sec.get("mounts", {}).get("volumes", []):
            k8s_schema(v, "io.k8s.api.core.v1.Volume")
        for m in sec.get("mounts", {}).get("volumeMounts", []):
            k8s_schema(m, "io.k8s.api.core.v1.VolumeMount")
    with pytest.raises(k8s_schema.error):
        k8s_schema({"name": "data", "mountpath": SHARED}, "io.k8s.api.core.v1.VolumeMount")


def test_one_image_everywhere(compose, k8s, values):
    images = {svc["image"] for svc in compose["services"].values()}
    for doc in (k8s["daskcluster.yaml"]["spec"], k8s["daskjob.yaml"]["spec"]["cluster"]["spec"]):
        for part in ("scheduler", "worker"):
            images |= {c["image"] for c in doc[part]["spec"]["containers"]}
    images |= {c["image"] for c in k8s["daskjob.yaml"]["spec"]["job"]["spec"]["containers"]}
    images |= {c["image"] for c in k8s["toolbox.yaml"]["spec"]["containers"]}
    images |= {f"{values[s]['image']['repository']}:{values[s]['image']['tag']}" for s in ("scheduler", "worker")}
    assert images == {IMAGE}


# ----------------------------------------------------------------------------------------------------------------
# SLURM (dask-jobqueue)


def import_run_manifest():
    spec = importlib.util.spec_from_file_location("helm_dask_run_manifest", DEPLOY / "slurm" / "run_manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jobqueue_config_builds_the_slurm_job_script(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="pip install dask-jobqueue")
    from dask_jobqueue import SLURMCluster
    from distributed.cli import dask_worker

    monkeypatch.chdir(tmp_path)  # dask-jobqueue creates the log directory
    doc = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    cfg = doc["jobqueue"]["slurm"]
    merged = dask.config.merge(dask.config.get("jobqueue"), doc["jobqueue"])
    with dask.config.set({"jobqueue": merged}):
        with SLURMCluster() as cluster:
            script = cluster.job_script()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --cpus-per-task=2" in header
    assert "#SBATCH --mem=4G" in header  # SLURM's G is GiB
    assert f"#SBATCH -t {cfg['walltime']}" in header
    assert "#SBATCH -J helm-dask-worker" in header
    assert "#SBATCH -o helm-dask-logs/helm-dask-worker-%J.out" in header
    for directive in cfg["job-extra-directives"]:
        assert f"#SBATCH {directive}" in header
    assert (tmp_path / "helm-dask-logs").is_dir()

    (line,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    words = shlex.split(line)
    assert words[0] == sys.executable and words[1:3] == ["-m", "distributed.cli.dask_worker"]
    p = dask_worker.main.make_context("dask worker", words[3:]).params
    assert not p["preload_argv"]
    assert p["scheduler"] == cluster.scheduler_address
    assert p["nthreads"] == 2
    assert parse_bytes(p["memory_limit"]) == 4 * 2**30
    assert p["local_directory"] == "${TMPDIR:-/tmp}"  # expanded by the job's shell on the compute node
    # workers retire before the walltime ends, even with the largest stagger
    h, m, s = (int(x) for x in cfg["walltime"].split(":"))
    assert parse_timedelta(p["lifetime"]) + parse_timedelta(p["lifetime_stagger"]) < h * 3600 + m * 60 + s


def test_run_manifest_dry_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dask_jobqueue", reason="pip install dask-jobqueue")
    monkeypatch.chdir(tmp_path)
    rm = import_run_manifest()
    manifest = DEPLOY / "manifest.example.yaml"
    rc = rm.main(
        [
            str(manifest),
            "--out",
            str(tmp_path / "out"),
            "--jobs",
            "3",
            "--queue",
            "short",
            "--walltime",
            "02:00:00",
            "--dry-run",
            "--",
            "--spacing",
            "native",
            "--k",
            "4-6",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "#SBATCH -p short" in out and "#SBATCH -t 02:00:00" in out and "#SBATCH --cpus-per-task=2" in out
    cmd = shlex.split(out.strip().splitlines()[-1])
    assert cmd[:3] == [sys.executable, "-m", "helm_dask.cli"]
    args = parse_helm(["helm-dask", *cmd[3:]])
    assert args.command == "run" and args.scan == str(manifest.resolve())
    assert args.out == str(tmp_path / "out") and args.spacing == "native" and args.k == "4-6"
    assert re.fullmatch(r"tcp://[^:]+:\d+", args.scheduler)
    assert dask.config.get("jobqueue.slurm.cores") is None  # the configuration is not left behind


def test_run_manifest_rejects_a_config_without_jobqueue(tmp_path):
    rm = import_run_manifest()
    bad = tmp_path / "bad.yaml"
    bad.write_text("slurm:\n  cores: 2\n")
    with pytest.raises(SystemExit, match="jobqueue"):
        rm.load_jobqueue_config(bad)
