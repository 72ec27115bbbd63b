"""A package that stands alone: the command line starts without loading the scientific stack, the public names
that load lazily still import, the licence and metadata build as PyPI needs them (SPDX licence, LICENSE in the
wheel, no setuptools deprecation), the documentation links stay inside the repository, and the colour table
written next to the label maps says that its cluster codes are not FreeSurfer's structures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What ``helm-dask --help`` must not load (each takes tens to hundreds of ms; together 1-2 s).
HEAVY = (
    "numpy",
    "xarray",
    "pandas",
    "dask",
    "distributed",
    "zarr",
    "numcodecs",
    "scipy",
    "numba",
    "matplotlib",
    "nibabel",
    "sklearn",
    "nilearn",
    "yaml",
    "jinja2",
    "psutil",
    "fsspec",
    "isal",
    "bokeh",
)

# Runs in a fresh interpreter: the modules the CLI's import loads, then those that printing each command's help
# loads, as the top-level names that were not there before (the interpreter's own start-up is left out).
_PROBE = """
import contextlib, io, json, sys
before = set(sys.modules)
def new():
    return sorted({m.split(".")[0] for m in set(sys.modules) - before})
import helm_dask.cli as cli
out = {"import": new()}
for cmd in ([], ["run"], ["info"], ["convert"], ["phantom"], ["compare"], ["demo"], ["synth"]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        cli.main([*cmd, "--help"])
    out[" ".join(cmd) or "--help"] = {"modules": new(), "chars": len(text.getvalue())}
print(json.dumps(out))
"""


def _probe() -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(res.stdout)


# ----------------------------------------------------------------------------------------------------------
# lazy imports
# ----------------------------------------------------------------------------------------------------------


def test_the_cli_and_its_help_load_no_scientific_module():
    seen = _probe()
    third_party = lambda mods: [m for m in mods if m not in sys.stdlib_module_names and m != "helm_dask"]
    assert not [m for m in seen["import"] if m in HEAVY], seen["import"]
    assert third_party(seen["import"]) == [], "importing helm_dask.cli loads third-party modules"
    for cmd, got in seen.items():
        if cmd == "import":
            continue
        assert got["chars"] > 500, f"helm-dask {cmd} --help printed almost nothing"
        assert third_party(got["modules"]) == [], f"helm-dask {cmd} --help loads {third_party(got['modules'])}"


def test_importing_the_package_loads_no_scientific_module():
    code = "import json, sys; b = set(sys.modules); import helm_dask; print(json.dumps(sorted(set(sys.modules) - b)))"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    loaded = {m.split(".")[0] for m in json.loads(res.stdout)}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_help_lists_every_command_option_and_choice():
    from helm_dask.background import FLUID_CHOICES
    from helm_dask.cli import build_parser
    from helm_dask.registry import UNTIL

    top = subprocess.run([sys.executable, "-m", "helm_dask.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert top.returncode == 0
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"info", "convert", "phantom", "run", "compare", "demo", "synth"}
    assert all(re.search(rf"^\s+{c}\s", top.stdout, re.M) for c in commands), top.stdout
    run = subprocess.run(
        [sys.executable, "-m", "helm_dask.cli", "run", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0
    text = " ".join(run.stdout.split())  # argparse wraps long lines
    for action in commands["run"]._actions:
        for flag in action.option_strings:
            assert flag in text, flag
    # the choices come from the registry and the mask method (independently of the parser's own lists)
    assert "--until {" + ",".join(UNTIL) + "}" in text
    assert "--fluid {" + ",".join(FLUID_CHOICES) + "}" in text
    assert "exit status:" in text and "compute:" in text


@pytest.mark.parametrize(
    ("module", "origin"),
    [
        ("helm_dask", {"make_volume": "helm_dask.volume", "like": "helm_dask.volume", "affine_of": "helm_dask.volume"}),
        ("helm_dask.pipeline", {"run_subject": "helm_dask.pipeline.runner", "RunParams": "helm_dask.pipeline.params"}),
        ("helm_dask.cli", {"ClusterOptions": "helm_dask.cluster", "compute_context": "helm_dask.cluster"}),
    ],
)
def test_names_that_load_lazily_still_import(module, origin):
    import importlib

    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    for name, home in origin.items():
        assert getattr(mod, name) is getattr(importlib.import_module(home), name)
        assert name in dir(mod)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        mod.nothing_here  # noqa: B018
    # the from-import form goes through the same hook
    ns: dict = {}
    exec(f"from {module} import {next(iter(origin))} as got", ns)
    assert ns["got"] is getattr(mod, next(iter(origin)))


# ----------------------------------------------------------------------------------------------------------
# licence and metadata
# ----------------------------------------------------------------------------------------------------------

MIT_GRANT = "Permission is hereby granted, free of charge, to any person obtaining a copy"


def test_pyproject_declares_an_spdx_licence_classifiers_and_urls():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, build = meta["project"], meta["build-system"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    setuptools = [r for r in build["requires"] if r.startswith("setuptools")]
    assert len(setuptools) == 1 and (m := re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0]))
    assert int(m.group(1)) >= 77, "the SPDX licence string needs setuptools >= 77"
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: no License classifiers"
    for c in (
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Image Processing",
        "Programming Language :: Python :: 3.11",
    ):
        assert c in classifiers
    # the Python versions named are the ones requires-python allows
    assert project["requires-python"] == ">=3.11"
    assert all(int(c.rsplit(".", 1)[1]) >= 11 for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c))
    assert set(project["urls"]) >= {"Homepage", "Source", "Documentation", "Issues"}
    assert all(u.startswith("https://") for u in project["urls"].values())
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and MIT_GRANT in text
    assert re.search(r"^Copyright \(c\) \d{4} the helm-dask developers$", text, re.M)


def test_the_wheel_carries_the_licence_and_builds_without_deprecation(tmp_path):
    """``pip wheel`` as a user would run it (build isolation: setuptools from PyPI), from a copy of the tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "helm_dask", src / "helm_dask", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-v", "-w", str(tmp_path / "whl")],
        capture_output=True,
        text=True,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    # setuptools' warnings (the licence table, License classifiers, ...), not pip's own notices
    assert "SetuptoolsDeprecationWarning" not in log, [line for line in log.splitlines() if "eprecat" in line]
    (wheel,) = (tmp_path / "whl").glob("helm_dask-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        licence = z.read(f"{dist_info}/licenses/LICENSE").decode()
    assert metadata["License-Expression"] == "MIT" and metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None  # the old free-text field is gone
    assert not [c for c in metadata.get_all("Classifier") if c.startswith("License ::")]
    assert {u.split(",")[0] for u in metadata.get_all("Project-URL")} >= {"Homepage", "Source", "Issues"}
    assert licence == (ROOT / "LICENSE").read_text()
    assert "helm_dask/templates/qc.html.j2" in names


# ----------------------------------------------------------------------------------------------------------
# documentation
# ----------------------------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _docs() -> list[Path]:
    return [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "bench").glob("*.md")),
        *sorted((ROOT / "deploy").rglob("*.md")),
    ]


def test_documentation_links_stay_inside_the_repository():
    bad = []
    for doc in _docs():
        for target in _LINK.findall(doc.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target}")
    assert bad == []


def test_the_method_page_is_linked_and_links_every_stage_page():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/method.md)" in readme
    method = (ROOT / "docs" / "method.md").read_text()
    pages = {p.name for p in (ROOT / "docs" / "method").glob("*.md")} - {"README.md"}
    assert len(pages) == 13
    assert {m for m in re.findall(r"\]\(method/([a-z_]+\.md)\)", method)} == pages


# ----------------------------------------------------------------------------------------------------------
# the colour table
# ----------------------------------------------------------------------------------------------------------


def _read_like_freesurfer(text: str) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
    """FreeSurfer's ColorLUT reading (``read_fscolorlut.m``, freeview): lines that are blank or start with ``#``
    are skipped; every other line is ``code name R G B A`` with an integer code and a one-word name."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line[0] == "#":
            continue
        f = line.split()
        assert len(f) == 6 and re.fullmatch(r"\d+", f[0]), line
        rgba = tuple(int(x) for x in f[2:])
        assert all(0 <= v <= 255 for v in rgba), line
        assert int(f[0]) not in out, f"code {f[0]} twice"
        out[int(f[0])] = (f[1], rgba)
    return out


def test_the_lut_says_its_clusters_are_not_freesurfer_codes(tmp_path):
    from helm_dask.labels import LabelTable, lut_table, write_lut

    text = write_lut(tmp_path / "lut.txt", ks=(4, 5, 6, 7, 8, 9)).read_text()
    assert text == lut_table("freesurfer", (4, 5, 6, 7, 8, 9)).colorlut_text()  # what the pipeline writes
    header = [line for line in text.splitlines() if line.startswith("#")]
    said = " ".join(" ".join(line.lstrip("# ") for line in header).split())
    assert "codes 1-9 are k-means clusters, not FreeSurfer structures" in said
    assert "2 Left-Cerebral-White-Matter, 3 Left-Cerebral-Cortex" in said
    assert "never with FreeSurferColorLUT.txt" in said
    assert "801-810 (hypothalamic subunits) and 250 (fornix) are FreeSurfer's own codes" in said
    # every line in the format freeview reads, with the same entries helm-dask reads back
    entries = _read_like_freesurfer(text)
    assert entries == LabelTable.from_colorlut(tmp_path / "lut.txt").entries
    assert [entries[j][0] for j in range(1, 10)] == [f"kmeans-cluster-{j}" for j in range(1, 10)]
    assert entries[3][0] != "Left-Cerebral-Cortex" and entries[801][0] == "L_hypothalamus_anterior_inferior"


def test_a_renumbered_lut_names_the_codes_its_clusters_have(tmp_path):
    from helm_dask.labels import load_label_table, lut_table

    table = tmp_path / "published.tsv"
    table.write_text("".join(f"{j}\t{30 + j}\n" for j in range(1, 5)) + "801\t21\n")
    text = lut_table(load_label_table(table), (4,)).colorlut_text()
    said = " ".join(text.split())
    assert "codes 31-34 are k-means clusters" in said and "Left-Cerebral-Cortex" not in said
    assert "FreeSurfer's own codes" not in said  # 801 is 21 here
    assert {c for c, (n, _) in _read_like_freesurfer(text).items() if n.startswith("kmeans")} == {31, 32, 33, 34}
