"""SynthSeg-style synthetic ``(image, labels)`` pairs from a label map, seeded, reproducible and lazy on input:
:func:`generate_sample` makes one pair from a :class:`SynthConfig` and the :class:`SampleParams` that
:func:`sample_params` draws for ``(seed, index)``, :func:`iter_samples` streams NumPy pairs for a training loop and
:func:`write_samples` writes them to disk (``helm-dask synth``); a :class:`LabelSource` opens the label map once for
many samples, and :func:`plan_sample` / :func:`gather_tasks` expose the geometry and the chunk-by-chunk label gather.
The method (the five steps of a sample, the rounding convention, laziness and randomness) is described in
``docs/method/synth.md``.
"""

from __future__ import annotations

from .config import SynthConfig
from .gather import gather_tasks
from .generate import generate_sample, iter_samples
from .intensity import label_intensity
from .params import SampleParams, sample_params
from .plan import SamplePlan, plan_sample
from .source import CENTROID_SPACING_MM, HYPOTHALAMUS_CODES, LabelSource
from .write import write_samples

__all__ = [
    "CENTROID_SPACING_MM",
    "HYPOTHALAMUS_CODES",
    "LabelSource",
    "SampleParams",
    "SamplePlan",
    "SynthConfig",
    "gather_tasks",
    "generate_sample",
    "iter_samples",
    "label_intensity",
    "plan_sample",
    "sample_params",
    "write_samples",
]
