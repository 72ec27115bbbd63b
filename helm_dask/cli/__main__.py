"""``python -m helm_dask.cli``: the ``helm-dask`` command (as the console script)."""

import sys

from . import main

sys.exit(main())
