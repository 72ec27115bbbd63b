"""How a command's failures become exit statuses: signals stop it cleanly, OS errors become one-line errors."""

from __future__ import annotations

import contextlib
import os
import signal

from ..errors import HelmError


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised in the main thread; ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` once; a second one while stopping is ignored, so that the
    cleanup (stop the workers, remove unfinished outputs) is not cut short. Outside the main thread: nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _output_of(args) -> str | None:
    return getattr(args, "out", None) or getattr(args, "output", None)


def _os_error(e: OSError, args) -> HelmError:
    """An OS error that reached the top: an output problem (exit 3) or an input one (exit 2), in one line."""
    # here, not at the top: the CLI imports lazily so that `helm-dask --help` starts fast
    from ..io import location

    out = _output_of(args)
    name = e.filename if isinstance(e.filename, str) else None
    under_out = bool(
        out
        and name
        and not location.is_url(out)
        and os.path.abspath(name).startswith(os.path.abspath(out).rstrip(os.sep))
    )
    if e.errno in location.WRITE_ONLY_ERRNOS or (under_out and e.errno in location.OUTPUT_ERRNOS):
        return location.output_error(e, name or out or ".")
    return HelmError(
        f"cannot read or write this file ({os.strerror(e.errno) if e.errno else e})",
        path=name,
        hint="check the path and its permissions",
    )
