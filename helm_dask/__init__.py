"""helm-dask: HELM whole-brain label maps from ultra-high-resolution ex vivo MRI, out of core with Dask."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("helm-dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

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
