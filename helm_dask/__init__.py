"""helm-dask: HELM whole-brain label maps from ultra-high-resolution ex vivo MRI, out of core with Dask. The
volume helpers exported here (:func:`make_volume`, :func:`like`, ...) live in :mod:`helm_dask.volume` and load
on first use, so that importing the package (and ``helm-dask --help``) does not load xarray, dask or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import HelmError

if TYPE_CHECKING:
    from .volume import affine_of, like, make_volume, orientation_code, provenance_record, spacing_of

__all__ = [
    "HelmError",
    "__version__",
    "affine_of",
    "like",
    "make_volume",
    "orientation_code",
    "provenance_record",
    "spacing_of",
]

#: Names re-exported from :mod:`helm_dask.volume`, imported when first asked for (PEP 562).
_FROM_VOLUME = frozenset({"affine_of", "like", "make_volume", "orientation_code", "provenance_record", "spacing_of"})


def __getattr__(name: str) -> Any:
    if name in _FROM_VOLUME:
        value = getattr(importlib.import_module(".volume", __name__), name)
        globals()[name] = value  # once: later look-ups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_VOLUME)
