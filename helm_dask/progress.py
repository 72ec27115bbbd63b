"""A small progress bar on stderr without dependencies (:class:`Progress`): redrawn in a terminal, one line at
the start and one at the end when stderr is not a terminal (CI, log files) so that logs stay readable, and
silent with ``quiet``."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar for ``total`` units of work, on stderr.

    Parameters
    ----------
    total : float
        Units of work in all.
    desc : str
        What is being done (printed first).
    quiet : bool
        Print nothing.
    unit : str
        Name of the unit (kept for callers; not printed).

    Example
    -------
    >>> with Progress(3, "counting", quiet=True) as p:
    ...     p.update(2)
    >>> p.done
    2.0
    """

    def __init__(self, total: float, desc: str, *, quiet: bool = False, unit: str = ""):
        self.total = max(float(total), 1e-12)
        self.desc = desc
        self.quiet = quiet
        self.unit = unit
        self.done = 0.0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        if not quiet and not self.tty:
            print(f"{desc} ...", file=sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done (redrawn at most five times a second).

        Parameters
        ----------
        n : float
            Units done since the last call.
        """
        self.done += n
        if self.quiet or not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 30)
        elapsed = now - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0
        sys.stderr.write(f"\r{self.desc} [{bar:<30}] {frac * 100:5.1f}%  {elapsed:6.1f}s elapsed, ~{eta:5.0f}s left")
        sys.stderr.flush()

    def close(self) -> None:
        """Print the elapsed time (unless ``quiet``)."""
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            sys.stderr.write("\n")
        print(f"{self.desc} done in {elapsed:.1f}s", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self.tty and not self.quiet:
            sys.stderr.write("\n")
