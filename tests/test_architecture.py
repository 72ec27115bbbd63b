"""The code's shape: the stage registry is consistent with the steps, the docs and the layout; no function outside
the tests is over 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helm_dask.layout import HELM_LAYOUT, RECORDS, SubjectLayout
from helm_dask.pipeline import STEPS
from helm_dask.registry import STAGE_NAMES, STAGES, UNTIL, expand, producer_of, stage, stages_until

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 100


def test_every_stage_has_its_code_and_every_store_one_producer():
    assert list(STEPS) == list(STAGE_NAMES)
    ks = [4, 9]
    written: dict[str, str] = {}
    for s in STAGES:
        for name in s.outputs(ks):
            assert name not in written, f"{name} written by {written.get(name)} and {s.name}"
            written[name] = s.name
            assert producer_of(name) is s
        for r in s.records:
            assert r in RECORDS.values() and producer_of(r) is s
    # every store a stage reads was written by an earlier stage
    for i, s in enumerate(STAGES):
        for name in s.inputs(ks):
            assert STAGE_NAMES.index(written[name]) < i, (s.name, name)
    # every export is of a store written by its stage or an earlier one (bias exports the resampled mask and
    # labels with the preprocessed image); --until values cover every stage in order
    for i, s in enumerate(STAGES):
        assert all(STAGE_NAMES.index(written[n]) <= i for n in expand([e.store for e in s.exports], ks))
    assert [stages_until(u)[-1].name for u in UNTIL] == list(UNTIL.values())
    assert stages_until("mirror") == STAGES and stage("bias").until == "preprocess"


def test_the_helm_layout_links_exports_of_the_registry():
    exported = {f"{n}.nii.gz" for s in STAGES for n in expand([e.store for e in s.exports], [6])}
    links = SubjectLayout("out", "s1").helm_links([6])
    assert {Path(src).name for src, _ in links} <= exported
    assert len(links) == sum(len(v) for v in HELM_LAYOUT.values())


def test_architecture_page_shows_the_registry():
    """docs/architecture.md's stage table is the registry's (regenerate it from the message if this fails)."""

    def codes(xs):
        return ", ".join(f"`{x}`" for x in xs) or "--"

    rows = [
        "| stage | version | `--until` | reads | writes (helm.zarr) | records | NIfTI exports | options in its key |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in STAGES:
        reads = codes(s.reads) + (f" (+ {codes(s.also_reads)})" if s.also_reads else "")
        records = codes(s.records)
        exports = codes(f"{e.store}.nii.gz" for e in s.exports)
        rows.append(
            f"| {s.name} | {s.version} | {s.until} | {reads} | {codes(s.writes)} | {records} | {exports} "
            f"| {codes(s.options)} |"
        )
    expected = "\n".join(rows)
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- registry-table -->\n", 1)[1].split("\n<!-- /registry-table -->", 1)[0]
    assert table == expected, f"docs/architecture.md's table should read:\n{expected}"


def _long_functions(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("folder", ["helm_dask", "bench"])
def test_no_function_over_100_lines(folder):
    assert _long_functions(ROOT / folder) == []


def test_the_cli_offers_the_registry_s_until_values_and_the_mask_method_s_fluids():
    from helm_dask.background import FLUID_CHOICES
    from helm_dask.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    actions = {a.dest: a for a in run._actions}
    assert actions["until"].choices == list(UNTIL) and actions["until"].default == STAGES[-1].until
    assert tuple(actions["fluid"].choices) == FLUID_CHOICES
