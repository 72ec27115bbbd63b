"""helm-dask: HELM whole-brain label maps from ultra-high-resolution ex vivo MRI, out of core with Dask."""

from ._version import __version__
from .errors import HelmError
from .volume import (
    affine_of,
    like,
    make_volume,
    orientation_code,
    provenance_record,
    spacing_of,
)

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
