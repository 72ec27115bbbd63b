"""The HELM pipeline for one subject: the stages of :mod:`helm_dask.registry` run in order on the subject's
Zarr store, each skipped when its outputs carry its key (a hash of its parameters, its algorithm's version, the
input checksums and the keys of the stages it reads), so a rerun resumes where the last one stopped. The
entry point is :func:`run_subject` with a :class:`RunParams`; paths come from :class:`helm_dask.layout.SubjectLayout`.
Outputs may live on object storage (``s3://...``): see ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..registry import STAGE_NAMES as STAGES
from ..registry import STAGE_VERSIONS, UNTIL

if TYPE_CHECKING:
    from .params import FLUIDS, RunParams, check_params
    from .runner import arrange_helm_layout, run_stage, run_subject
    from .steps import STEPS, Run, Step
    from .subject import Subject, fingerprint_input, stage_key

# The rest loads on first use (PEP 562): importing helm_dask.pipeline.options, which declares `helm-dask run`'s
# options, runs this file, and `helm-dask --help` must not load the stages (xarray, dask, scipy) to print them.
_LAZY = {
    **dict.fromkeys(("FLUIDS", "RunParams", "check_params"), "params"),
    **dict.fromkeys(("arrange_helm_layout", "run_stage", "run_subject"), "runner"),
    **dict.fromkeys(("STEPS", "Run", "Step"), "steps"),
    **dict.fromkeys(("Subject", "fingerprint_input", "stage_key"), "subject"),
}

__all__ = [
    "FLUIDS",
    "STAGES",
    "STAGE_VERSIONS",
    "STEPS",
    "UNTIL",
    "Run",
    "RunParams",
    "Step",
    "Subject",
    "arrange_helm_layout",
    "check_params",
    "fingerprint_input",
    "run_stage",
    "run_subject",
    "stage_key",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once: later look-ups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
