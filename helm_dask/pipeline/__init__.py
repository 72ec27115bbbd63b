"""The HELM pipeline for one subject: the stages of :mod:`helm_dask.registry` run in order on the subject's
Zarr store, each skipped when its outputs carry its key (a hash of its parameters, its algorithm's version, the
input checksums and the keys of the stages it reads), so a rerun resumes where the last one stopped. The
entry point is :func:`run_subject` with a :class:`RunParams`; paths come from :class:`helm_dask.layout.SubjectLayout`.
Outputs may live on object storage (``s3://...``): see ``docs/architecture.md``.
"""

from ..registry import STAGE_NAMES as STAGES
from ..registry import STAGE_VERSIONS, UNTIL
from .params import FLUIDS, RunParams, check_params
from .runner import arrange_helm_layout, run_stage, run_subject
from .steps import STEPS, Run, Step
from .subject import Subject, fingerprint_input, stage_key

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
