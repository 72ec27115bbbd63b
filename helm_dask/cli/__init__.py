"""The ``helm-dask`` command line, a thin layer over the Python API: :func:`main` (the console script) parses the
arguments with :func:`build_parser`, runs the command and turns errors the user can fix into one line (file,
problem, fix) with a non-zero exit status and no traceback (``--debug`` shows it); each command group has its own
module (:mod:`~helm_dask.cli.files` for ``info`` and ``convert``, :mod:`~helm_dask.cli.phantom` for ``phantom``
and ``demo``, :mod:`~helm_dask.cli.run`, :mod:`~helm_dask.cli.compare`, :mod:`~helm_dask.cli.synth`), and
:mod:`~helm_dask.cli.options` holds what they share (exit statuses, argument types, compute and storage options).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import HelmError
from ..pipeline.options import _add_run_options as _add_run_options
from ..pipeline.options import _subject as _subject
from ..pipeline.options import run_option_actions
from .compare import _COMPARE_HINTS as _COMPARE_HINTS
from .compare import _compare as _compare
from .compare import add_compare_parser, cmd_compare
from .failures import Interrupted, _os_error, _stop_on_signals
from .failures import _output_of as _output_of
from .files import add_convert_parser, add_info_parser, cmd_convert, cmd_info
from .options import EXIT_CODES, EXIT_EPILOG, _add_compute_options, _Parser
from .options import _add_storage_options as _add_storage_options
from .options import _chunks as _chunks
from .options import _cluster_opts as _cluster_opts
from .options import _int_at_least as _int_at_least
from .options import _memory_limit as _memory_limit
from .options import _non_negative_float as _non_negative_float
from .options import _non_negative_int as _non_negative_int
from .options import _number as _number
from .options import _positive_float as _positive_float
from .options import _positive_int as _positive_int
from .options import _say as _say
from .options import _spacing as _spacing
from .options import _storage_options as _storage_options
from .phantom import add_demo_parser, add_phantom_parser, cmd_demo, cmd_phantom
from .run import add_run_parser, cmd_run
from .synth import add_synth_parser, cmd_synth, config_from_args

if TYPE_CHECKING:
    from ..cluster import ClusterOptions as ClusterOptions
    from ..cluster import compute_context as compute_context

__all__ = [
    "EXIT_CODES",
    "EXIT_EPILOG",
    "Interrupted",
    "add_synth_parser",
    "build_parser",
    "cmd_compare",
    "cmd_convert",
    "cmd_demo",
    "cmd_info",
    "cmd_phantom",
    "cmd_run",
    "cmd_synth",
    "config_from_args",
    "main",
    "run_option_actions",
]
# The ``import X as X`` above keep the other names of the former single-module ``cli.py`` importable from here;
# the two from helm_dask.cluster load on first use (``__getattr__``), since dask is not needed to parse arguments.


_FROM_CLUSTER = ("ClusterOptions", "compute_context")


def __getattr__(name: str) -> Any:
    if name in _FROM_CLUSTER:
        return getattr(importlib.import_module("..cluster", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_CLUSTER))


def _common_options() -> argparse.ArgumentParser:
    """The parent parser of every command: ``--quiet`` and ``--debug``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print only errors")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``helm-dask`` argument parser with every sub-command.

    Returns
    -------
    ArgumentParser
        Parsing a command line gives its options and ``func``, the function that runs the command.

    Example
    -------
    >>> args = build_parser().parse_args(["info", "scan.nii.gz", "--json"])
    >>> args.command, args.json, args.func is cmd_info
    ('info', True, True)
    """
    parser = _Parser(
        prog="helm-dask",
        description="HELM whole-brain label maps from ultra-high-resolution ex vivo MRI, out of core with Dask.",
        epilog=EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"helm-dask {__version__}")
    common = [_common_options()]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # the order here is the order of ``helm-dask --help``
    add_info_parser(sub, common)
    add_convert_parser(sub, common)
    add_phantom_parser(sub, common)
    add_run_parser(sub, common)
    add_compare_parser(sub, common)
    add_demo_parser(sub, common)
    add_synth_parser(sub, common, _add_compute_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``helm-dask`` with the arguments ``argv`` (default: the command line); the console script.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name.

    Returns
    -------
    int
        The exit status (:data:`EXIT_CODES`): 0 on success, 2 for bad input, 3 for an output that cannot be
        written, 1 for an internal error, 128 + the signal number when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..io.location import MAIN_PID_ENV

    # the fault-injection hook (HELM_DASK_FAULT), reached in a worker, stops this process (see location.fault)
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    with _stop_on_signals():
        try:
            return int(args.func(args) or 0)
        except HelmError as e:
            if args.debug:
                raise
            print(f"helm-dask: error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
            from ..io.store import remove_live_temporaries

            # the cluster is shut down by now: no straggling write can recreate what this removes
            remove_live_temporaries()
            signum = getattr(e, "signum", signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(
                f"helm-dask: {what}: workers stopped, unfinished outputs removed, finished stages kept (rerun "
                f"the same command to resume)",
                file=sys.stderr,
            )
            return 128 + int(signum)
        except BrokenPipeError:
            # the reader of our output went away (| head): stop quietly, as other command-line tools do
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except OSError as e:
            if args.debug:
                raise
            print(f"helm-dask: error: {_os_error(e, args)}", file=sys.stderr)
            return _os_error(e, args).exit_code
        except Exception as e:  # an internal error: keep it short unless --debug
            if args.debug:
                raise
            print(
                f"helm-dask: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and "
                f"please report it)",
                file=sys.stderr,
            )
            return 1
