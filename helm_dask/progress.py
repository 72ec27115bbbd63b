"""Progress on stderr without dependencies: :class:`Progress` counts a known amount of work and shows it as a bar
redrawn in place in a terminal, or, when stderr is not a terminal (CI, log files, a batch queue), as one line per
10% with the elapsed time and an estimate of the time left, so that logs stay readable; ``quiet`` silences it.
:func:`stage_progress` makes a :class:`StageProgress` the current tracker of a pipeline stage (:func:`current`):
the batched writes and passes of :mod:`helm_dask.io.store` announce their chunks to it and count each chunk as it
is done, so that one bar covers the whole stage, whatever the batches and the scheduler.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TextIO

#: A line per this many percent when stderr is not a terminal.
STEP_PCT = 10
#: A terminal bar is redrawn at most this often (seconds): redrawing costs the terminal, not the run.
REDRAW_S = 0.2
#: A stage's terminal bar is also redrawn this often while nothing is counted (a model being fitted), so that
#: its elapsed time keeps moving.
TICK_S = 1.0
_BAR = 30
#: Terminal bars being drawn by plain :class:`Progress` objects: a stage's bar keeps still meanwhile (one line).
_OPEN_BARS: weakref.WeakSet = weakref.WeakSet()


def format_duration(seconds: float) -> str:
    """A duration as ``45s``, ``2m10s`` or ``1h05m``.

    Parameters
    ----------
    seconds : float
        The duration.

    Returns
    -------
    str

    Examples
    --------
    >>> format_duration(44.6), format_duration(130), format_duration(3900)
    ('45s', '2m10s', '1h05m')
    """
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress through ``total`` units of work, on stderr.

    In a terminal a bar is redrawn in place (at most five times a second); otherwise a line is printed each
    time another 10% is done, e.g. ``kmeans:  40% (1234/3085 chunks) 2m10s elapsed, ETA 3m15s``, and a last
    one at 100% (also when the work ends before the count says so). The shown percentage never decreases.

    Parameters
    ----------
    total : float or None
        Units of work in all (None: not known yet; see :meth:`set_total`).
    desc : str
        What is being done (printed first).
    quiet : bool
        Print nothing.
    unit : str
        Name of the unit (``chunks``, ``slabs``...), printed after the counts.
    stream : file, optional
        Where to print; default ``sys.stderr`` at the time of the call.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(4, "counting", unit="steps", stream=out) as p:
    ...     p.update(2)
    >>> print(out.getvalue().splitlines()[0][:33])
    counting:  50% (2/4 steps) 0s ela
    >>> p.done
    2.0
    """

    def __init__(
        self, total: float | None, desc: str, *, quiet: bool = False, unit: str = "", stream: TextIO | None = None
    ):
        self.total = None if total is None else max(float(total), 0.0)
        self.desc = desc
        self.quiet = quiet
        self.unit = unit
        self.done = 0.0
        self.t0 = _now()
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self._shown = 0.0  # the largest fraction shown so far
        self._decade = 0  # the last 10% step printed (not a terminal)
        self._drawn: float | None = None  # when the bar was last drawn (terminal)
        self._closed = False
        self._lock = threading.RLock()  # a stage's ticker thread draws too
        if self.tty and not quiet and type(self) is Progress:
            _OPEN_BARS.add(self)

    # -- counting -------------------------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        """Count ``n`` more units done (negative: take back units of work that will be done again).

        Parameters
        ----------
        n : float
            Units done since the last call.
        """
        self.done += n
        self._report()

    def set_total(self, total: float | None) -> None:
        """Change the amount of work (an estimate that became better).

        Parameters
        ----------
        total : float or None
            Units of work in all.
        """
        self.total = None if total is None else max(float(total), 0.0)
        self._report()

    def fraction(self) -> float | None:
        """The fraction done, between 0 and 1 (None while the total is not known).

        Returns
        -------
        float or None
        """
        if self.total is None:
            return None
        if self.total <= 0:
            return 1.0
        return min(1.0, max(0.0, self.done / self.total))

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the rate so far (None before any unit is done or while the total is not known).

        The rate is that of the time spent on counted work (a stage leaves out the time it spends on work it
        does not count, such as fitting a model: :class:`StageProgress`).

        Parameters
        ----------
        now : float, optional
            ``time.perf_counter()`` of the estimate.

        Returns
        -------
        float or None
        """
        if self.total is None or self.done <= 0:
            return None
        now = _now() if now is None else now
        return max(0.0, self._work_seconds(now) * max(0.0, self.total - self.done) / self.done)

    def _work_seconds(self, now: float) -> float:
        """The time the counted units took (here: since the start)."""
        return now - self.t0

    # -- output ---------------------------------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The progress as one line (no bar), e.g. ``kmeans:  40% (1234/3085 chunks) 2m10s elapsed, ETA 3m15s``.

        Returns
        -------
        str
        """
        now = _now() if now is None else now
        frac = self._shown
        unit = f" {self.unit}" if self.unit else ""
        total = self.total if self.total is not None else self.done
        text = f"{self.desc}: {frac * 100:3.0f}% ({min(self.done, total):.0f}/{total:.0f}{unit})"
        text += f" {format_duration(now - self.t0)} elapsed"
        eta = self.eta_s(now)
        if frac < 1.0 and eta is not None:
            text += f", ETA {format_duration(eta)}"
        return text

    def _report(self, final: bool = False, force: bool = False) -> None:
        if self.quiet or self._closed:
            return
        with self._lock:
            frac = self.fraction()
            if frac is None:
                return
            self._shown = max(self._shown, 1.0 if final else frac)
            now = _now()
            if self.tty:
                if final or force or self._drawn is None or now - self._drawn >= REDRAW_S:
                    self._draw(now)
                return
            decade = int(self._shown * 100 + 1e-9) // STEP_PCT
            if decade > self._decade or (final and self._decade < 100 // STEP_PCT):
                self._decade = max(decade, self._decade)
                print(self.line(now), file=self.stream, flush=True)

    def _draw(self, now: float) -> None:
        self._drawn = now
        bar = "#" * int(self._shown * _BAR)
        head, _, tail = self.line(now).partition(": ")
        self.stream.write(f"\r{head} [{bar:<{_BAR}}] {tail}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """The work is done: show 100% (unless ``quiet``, or nothing was ever counted) and end the bar's line."""
        with self._lock:
            if not self.quiet and not self._closed and self.total is not None:
                if self.done > 0:
                    self.total = self.done  # the work was what was done (an estimated total may have been off)
                self._report(final=True)
                if self.tty:
                    self.stream.write("\n")
                    self.stream.flush()
            self._closed = True
            _OPEN_BARS.discard(self)

    def abort(self) -> None:
        """The work stopped early: end the terminal's bar line (so that the error starts a line of its own)."""
        with self._lock:
            if self.tty and not self.quiet and not self._closed and self._drawn is not None:
                self.stream.write("\n")
                self.stream.flush()
            self._closed = True
            _OPEN_BARS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()


class StageProgress(Progress):
    """The progress of one pipeline stage, in chunks: those of its output stores and of its batched passes.

    The runner knows how many stores the stage will write and guesses their chunks (those of a volume the stage
    reads); each batched write announces its stores' chunks when it begins (:meth:`begin_outputs`), which
    replaces the guess (a stage's stores share one grid: stores not begun yet count as the mean of those
    begun), and each batched pass over a volume announces its chunks (:meth:`begin_pass`). The rate behind the
    ETA is that of the counted work only: from each announcement to the last chunk counted after it, so that a
    model fitted between two passes does not count as time spent on chunks. In a terminal the bar is also
    redrawn every second while nothing is counted.

    Parameters
    ----------
    desc : str
        The stage (e.g. ``[subject] kmeans``).
    outputs : int
        Stores the stage will write.
    chunks_per_output : int, optional
        The guess of each store's chunks until one begins (None: no total until then).
    quiet, stream :
        As :class:`Progress`.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> with StageProgress("bias", outputs=2, stream=out) as p:
    ...     p.begin_outputs([10])
    ...     p.update(10)
    ...     p.begin_outputs([10])
    ...     p.update(10)
    >>> [line.split(" (")[0] for line in out.getvalue().splitlines()]
    ['bias:  50%', 'bias: 100%']
    """

    def __init__(
        self,
        desc: str,
        *,
        outputs: int,
        chunks_per_output: int | None = None,
        quiet: bool = False,
        stream: TextIO | None = None,
    ):
        super().__init__(None, desc, quiet=quiet, unit="chunks", stream=stream)
        self._pending = max(0, int(outputs))
        self._guess = chunks_per_output
        self._outputs: list[int] = []
        self._passes: list[int] = []
        self._worked = 0.0  # seconds of counted work in the announcements before the current one
        self._since: float | None = None  # when the current announcement was made
        self._last = 0.0  # when the last chunk was counted
        self.set_total(self._estimate())
        self._stop = threading.Event()
        if self.tty and not quiet:
            threading.Thread(target=self._tick, name="helm-dask-progress", daemon=True).start()

    def begin_outputs(self, chunks: list[int]) -> None:
        """Stores begin to be written.

        Parameters
        ----------
        chunks : list of int
            The chunks each store will be written in.
        """
        with self._lock:
            self._announce()
            self._outputs.extend(int(c) for c in chunks)
            self._pending = max(0, self._pending - len(chunks))
            self.set_total(self._estimate())

    def begin_pass(self, chunks: int) -> None:
        """A batched pass over a volume begins (its chunks are counted like written ones).

        Parameters
        ----------
        chunks : int
            The chunks it computes.
        """
        with self._lock:
            self._announce()
            self._passes.append(int(chunks))
            self.set_total(self._estimate())

    def update(self, n: float = 1) -> None:
        with self._lock:
            self._last = _now()
            super().update(n)

    def _announce(self) -> None:
        now = _now()
        if self._since is not None:
            self._worked += max(0.0, self._last - self._since)
        self._since = now

    def _work_seconds(self, now: float) -> float:
        return self._worked + (0.0 if self._since is None else max(0.0, now - self._since))

    def _estimate(self) -> float | None:
        per_store = sum(self._outputs) / len(self._outputs) if self._outputs else self._guess
        if per_store is None:
            return sum(self._passes) or None
        return sum(self._outputs) + sum(self._passes) + self._pending * per_store

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if not self._closed and not any(not b._closed for b in list(_OPEN_BARS)):
                    self._report(force=True)

    def close(self) -> None:
        self._stop.set()
        super().close()

    def abort(self) -> None:
        self._stop.set()
        super().abort()


_CURRENT: ContextVar[StageProgress | None] = ContextVar("helm_dask_stage_progress", default=None)


def current() -> StageProgress | None:
    """The tracker of the stage being computed in this context (None outside a stage, or when it is quiet).

    A context variable: each subject of a concurrent batch runs in its own copy of the context
    (:func:`contextvars.copy_context`, :func:`helm_dask.batch.run_batch`), so its stores count on its own stage.

    Returns
    -------
    StageProgress or None

    Examples
    --------
    >>> current() is None
    True
    """
    tracker = _CURRENT.get()
    return None if tracker is None or tracker.quiet else tracker


@contextlib.contextmanager
def stage_progress(
    desc: str,
    *,
    outputs: int,
    chunks_per_output: int | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> Iterator[StageProgress]:
    """Make a :class:`StageProgress` the current tracker (:func:`current`) while a stage computes.

    Parameters
    ----------
    desc : str
        The stage (e.g. ``[subject] kmeans``).
    outputs : int
        Stores the stage will write.
    chunks_per_output : int, optional
        A guess of each store's chunks (see :class:`StageProgress`).
    quiet : bool
        Print nothing (and let the stores skip counting).
    stream : file, optional
        Where to print; default ``sys.stderr``.

    Yields
    ------
    StageProgress

    Examples
    --------
    >>> with stage_progress("merge", outputs=1, quiet=True) as p:
    ...     current() is None
    True
    """
    tracker = StageProgress(desc, outputs=outputs, chunks_per_output=chunks_per_output, quiet=quiet, stream=stream)
    token = _CURRENT.set(tracker)
    try:
        with tracker:
            yield tracker
    finally:
        _CURRENT.reset(token)


def _now() -> float:
    return time.perf_counter()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
