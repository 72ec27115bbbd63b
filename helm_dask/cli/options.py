"""What every ``helm-dask`` command shares: the exit statuses, the argument types, the compute and storage
option groups and the parser class with one-line usage errors."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING, Any, TypeAlias

# The argument types and the storage option of the run options live with them (helm_dask.pipeline.options:
# manifests use them too); the other commands share them from here.
from ..pipeline.options import _add_storage_options as _add_storage_options
from ..pipeline.options import _chunks as _chunks
from ..pipeline.options import _int_at_least as _int_at_least
from ..pipeline.options import _non_negative_float as _non_negative_float
from ..pipeline.options import _non_negative_int as _non_negative_int
from ..pipeline.options import _number as _number
from ..pipeline.options import _positive_float as _positive_float
from ..pipeline.options import _positive_int as _positive_int
from ..pipeline.options import _spacing as _spacing

if TYPE_CHECKING:
    from ..cluster import ClusterOptions

#: The sub-command table ``build_parser`` fills (``add_subparsers``' result); each command group adds its own.
#: A string: argparse's action class is generic only in the type stubs.
Subparsers: TypeAlias = "argparse._SubParsersAction[Any]"

#: Exit statuses of every command (also in README.md and ``--help``).
EXIT_CODES = (
    (0, "success (a batch: every subject finished)"),
    (1, "internal error: a bug, please report it (--debug shows the traceback)"),
    (
        2,
        "bad input: a missing, unreadable or invalid file, option or manifest, or an unreachable cluster; the "
        "one-line message names the file or flag and the fix",
    ),
    (
        3,
        "the output cannot be written: it exists (without --overwrite), --out is or lies under a file, a "
        "read-only file system, no permission, a full disk; nothing half-written is kept",
    ),
    (4, "a batch (manifest) run where some subjects failed; the others finished (see the summary)"),
    (130, "interrupted (Ctrl-C): the workers are stopped, unfinished outputs removed; rerun to resume"),
    (141, "the reader of the output went away (e.g. `helm-dask info ... | head`)"),
    (143, "terminated (SIGTERM, e.g. a batch system's time limit): as for 130"),
)
EXIT_EPILOG = "exit status:\n" + "\n".join(
    textwrap.fill(text, 100, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7) for code, text in EXIT_CODES
)


def _memory_limit(text: str) -> str:
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..cluster import parse_memory_limit

    try:
        return parse_memory_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_compute_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "compute",
        "Default: a LocalCluster of worker processes on this machine. TLS: --tls-ca/--tls-cert/--tls-key "
        "(mutual TLS; also used by that LocalCluster), or without flags a Dask config file "
        "(distributed.comm.tls.* and distributed.comm.require-encryption; DASK_CONFIG=FILE).",
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="join a running Dask cluster (tcp://HOST:PORT, tls://HOST:PORT or a scheduler JSON file); "
        "'threads' or 'synchronous' compute in this process",
    )
    g.add_argument("--workers", type=_positive_int, metavar="N", help="LocalCluster worker processes (default: 2)")
    g.add_argument("--threads-per-worker", type=_positive_int, metavar="N", help="threads per worker (default: 1)")
    g.add_argument(
        "--memory-limit",
        type=_memory_limit,
        metavar="SIZE",
        help="memory limit per worker, e.g. 4GB, at least 512MiB (default: auto)",
    )
    g.add_argument(
        "--dashboard-address",
        default="127.0.0.1:0",
        help="where the LocalCluster dashboard listens (default: localhost, random port)",
    )
    g.add_argument(
        "--tls-ca", metavar="FILE", help="TLS: PEM certificate of the CA that signed the cluster's certificates"
    )
    g.add_argument(
        "--tls-cert", metavar="FILE", help="TLS: PEM certificate this client (and its LocalCluster) presents"
    )
    g.add_argument("--tls-key", metavar="FILE", help="TLS: PEM private key of --tls-cert")


def _cluster_opts(args) -> ClusterOptions:
    # here, not at the top: helm_dask.cluster loads dask, which `helm-dask --help` does not need
    from ..cluster import ClusterOptions

    return ClusterOptions.from_args(args)


def _compute(args):
    """The compute context a command's options ask for (a LocalCluster, a running cluster, or this process)."""
    # here, not at the top: helm_dask.cluster loads dask, which `helm-dask --help` does not need
    from ..cluster import compute_context

    return compute_context(_cluster_opts(args))


def _say(args, *msg) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


def _storage_options(args) -> dict | None:
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..io.location import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the usage is one ``--help`` away), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")
