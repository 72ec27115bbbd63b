"""Batch runs: a manifest (YAML or CSV, :func:`load_manifest` describes the format) of subjects run one after
the other, or several at once (``--concurrent-subjects``), on one cluster; :func:`plan_batch` checks the whole
manifest before anything runs, :func:`run_batch` runs every subject (a failing subject is reported and the others
still run, each resuming stage by stage like a single run) and :func:`format_summary` prints the table;
:data:`OPTION_TO_FIELD`/:func:`run_params_kwargs` are the one mapping from ``helm-dask run`` options to
:class:`~helm_dask.pipeline.RunParams`.
"""

from __future__ import annotations

import argparse
import contextvars
import csv
import ctypes
import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, cast

import dask

from .errors import HelmError
from .io.location import is_url, parse_storage_options
from .io.regions import cache_owner
from .labels import K_MAX, K_MIN, parse_label_map
from .pipeline import RunParams, run_subject
from .pipeline.options import run_option_actions

_FIELDS = {f.name for f in fields(RunParams)}
#: Older spellings still accepted as manifest keys.
KEY_ALIASES = {"ks": "k", "name": "subject"}
#: Keys whose (relative) paths are relative to the manifest's folder.
PATH_KEYS = ("scan", "hypothalamus", "mask", "reference_tissue", "label_table")
#: Keys that describe one subject: not allowed under ``params:`` (shared by every subject).
PER_SUBJECT_KEYS = ("scan", "hypothalamus", "subject", "mask", "reference_tissue")


def parse_ks(text: Any) -> tuple[int, ...]:
    """The k values of ``--k``.

    Parameters
    ----------
    text : str or sequence of int
        A range ``"4-9"``, a list ``"4,6,9"`` (or both, comma-separated), or the integers themselves.

    Returns
    -------
    tuple of int
        Sorted, unique, each within :data:`~helm_dask.labels.K_MIN`..:data:`~helm_dask.labels.K_MAX` (else
        HelmError).

    Example
    -------
    >>> parse_ks("4-9"), parse_ks("4,6,9"), parse_ks([5, 4])
    ((4, 5, 6, 7, 8, 9), (4, 6, 9), (4, 5))
    """
    if isinstance(text, (list, tuple)):
        try:
            ks = [int(k) for k in text]
        except (TypeError, ValueError):
            raise HelmError(f"--k {text!r} is not a list of integers", hint="e.g. --k 4-9 or --k 4,6,8") from None
    else:
        text = str(text).strip()
        ks = []
        try:
            for part in text.split(","):
                if "-" in part:
                    a, b = part.split("-", 1)
                    ks.extend(range(int(a), int(b) + 1))
                elif part:
                    ks.append(int(part))
        except ValueError:
            raise HelmError(
                f"--k {text!r} is not a list or range of integers", hint="e.g. --k 4-9 or --k 4,6,8"
            ) from None
    bad = [k for k in ks if not K_MIN <= k <= K_MAX]
    if not ks or bad:
        raise HelmError(f"k must be between {K_MIN} and {K_MAX} (got {bad or 'nothing'})", hint="e.g. --k 4-9")
    return tuple(sorted(set(ks)))


# ----------------------------------------------------------------------------------------------------------------
# Run options -> RunParams: the one mapping used by the CLI and by manifests


def _not(v) -> bool:
    return not v


def _label_map(v):
    return parse_label_map(v)


def _storage_options(v):
    return parse_storage_options(v)


#: ``run`` options whose RunParams field has another name or needs parsing; every other option is the field
#: of the same name (a test checks that each option has one).
OPTION_TO_FIELD = {
    "k": ("ks", parse_ks),
    "no_qc": ("qc", _not),
    "no_nifti": ("nifti", _not),
    "label_map": ("label_map", _label_map),
    "storage_options": ("storage_options", _storage_options),
}


@functools.lru_cache(maxsize=1)
def manifest_keys() -> dict[str, argparse.Action]:
    """The manifest keys, derived from the ``run`` parser (so a new flag is a manifest key at once).

    Returns
    -------
    dict of str to argparse.Action
        ``scan`` and the options of ``helm-dask run`` (underscored names), except ``out`` and the compute and
        output options (:func:`helm_dask.cli.run_option_actions`).
    """
    return run_option_actions()


def run_params_kwargs(options: dict) -> dict:
    """RunParams keyword arguments from run options.

    Parameters
    ----------
    options : dict
        ``{run option dest: value}``, values as the flags give them.

    Returns
    -------
    dict
        Keyword arguments of :class:`~helm_dask.pipeline.RunParams` (renamed and parsed by
        :data:`OPTION_TO_FIELD`).

    Example
    -------
    >>> run_params_kwargs({"k": "4-5", "no_qc": True, "spacing": "0.3"})
    {'ks': (4, 5), 'qc': False, 'spacing': '0.3'}
    """
    kw = {}
    for dest, value in options.items():
        name, convert = OPTION_TO_FIELD.get(dest, (dest, None))
        if name not in _FIELDS:
            raise RuntimeError(f"the run option {dest!r} has no RunParams field")  # a programming error
        kw[name] = convert(value) if convert is not None else value
    return kw


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _value(key: str, value, action: argparse.Action):
    """A manifest value checked and converted like the flag's argument (same type, choices and limits)."""
    if action.nargs == 0:  # a switch: --no-qc, --resample-labels, ...
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE + _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
        raise HelmError(f"{key!r} is a switch (true or false), not {value!r}")
    if isinstance(action, argparse._AppendAction):  # --label-map: a list, a mapping or "A=B,C=D"
        return value if isinstance(value, (list, dict)) else [str(value)]
    if isinstance(value, (dict, list)) and action.type is None:
        return value  # k: [4, 6]; storage_options: a mapping
    if isinstance(value, list):  # chunks: [128, 128, 64] as the flag's 128,128,64
        value = ",".join(map(str, value))
    if isinstance(value, (dict, bool)):
        raise HelmError(f"{key!r} must be a single value, not {value!r}")
    text = str(value)
    if action.type is not None:
        convert = cast(Callable[[str], Any], action.type)  # the run parser's types are callables, not names
        try:
            value = convert(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise HelmError(f"{key!r}: {e}") from None
    else:
        value = text
    if action.choices is not None and value not in action.choices:
        raise HelmError(f"{key!r} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return value


def _check_keys(keys, where: str, path) -> None:
    known = manifest_keys()
    for k in keys:
        name = KEY_ALIASES.get(k, str(k).replace("-", "_"))
        if name in known:
            continue
        if name == "out":
            raise HelmError(
                f"{where}: 'out' is not a manifest key (every subject writes to --out/<subject>)",
                path=path,
                hint="remove it; give --out on the command line and 'subject:' per row",
            )
        raise HelmError(f"{where}: unknown key {k!r}", path=path, hint=f"known keys: {', '.join(sorted(known))}")


def _read_yaml(text: str, p: Path) -> tuple[dict, list[dict]]:
    """``params:`` and ``subjects:`` of a YAML manifest (``yaml.safe_load``: no object construction)."""
    import yaml

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise HelmError(f"is not valid YAML ({detail})", path=p, hint="fix the manifest") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("subjects"), list):
        raise HelmError("has no 'subjects:' list", path=p, hint="see 'helm-dask run --help' for the format")
    extra = sorted(str(k) for k in doc if k not in ("params", "subjects"))
    if extra:
        raise HelmError(
            f"unknown top-level key {extra[0]!r}",
            path=p,
            hint="a manifest has 'params:' (shared options) and 'subjects:' (one row per subject)",
        )
    shared = doc.get("params") or {}
    if not isinstance(shared, dict):
        raise HelmError("'params:' is not a mapping of options", path=p, hint="e.g. params: {spacing: 0.3}")
    subjects = []
    for i, s in enumerate(doc["subjects"]):
        if not isinstance(s, dict):
            raise HelmError(
                f"subject {i + 1} is not a mapping of keys ({s!r})",
                path=p,
                hint="e.g. - {scan: s1.nii.gz, hypothalamus: s1_hypo.nii.gz}",
            )
        subjects.append(dict(s))
    return dict(shared), subjects


def _read_csv(text: str, p: Path) -> list[dict]:
    """The subject rows of a CSV manifest (cells stripped; a CSV has no shared parameters)."""
    try:
        rows = list(csv.DictReader(text.splitlines()))
    except csv.Error as e:
        raise HelmError(f"is not valid CSV ({e})", path=p, hint="fix the manifest") from None
    subjects = []
    for i, row in enumerate(rows):
        if None in row:
            raise HelmError(
                f"subject {i + 1} has more cells than the header has columns",
                path=p,
                hint="fix the CSV (quote cells that contain commas)",
            )
        subjects.append({k.strip(): (v or "").strip() for k, v in row.items() if k})
    return subjects


def _check_rows(shared: dict, subjects: list[dict], p: Path) -> None:
    """Check the keys of ``params:`` and of every row; make relative paths relative to the manifest's folder."""
    base = p.parent
    _check_keys(shared, "params", p)
    per_subject = [k for k in shared if KEY_ALIASES.get(k, k) in PER_SUBJECT_KEYS]
    if per_subject:
        raise HelmError(f"params: {per_subject[0]!r} is one subject's", path=p, hint="put it in each subject's row")
    for i, s in enumerate(subjects):
        _check_keys(s, f"subject {i + 1}", p)
        for key in ("scan", "hypothalamus"):
            if not s.get(key):
                raise HelmError(
                    f"subject {i + 1} has no '{key}'", path=p, hint="every subject needs scan and hypothalamus"
                )
        for key in PATH_KEYS:
            v = s.get(key)
            if (
                isinstance(v, str)
                and v
                and not os.path.isabs(v)
                and not is_url(v)
                and not (key == "label_table" and v in ("freesurfer", "helm"))
            ):
                s[key] = str(base / v)


def load_manifest(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Shared parameters and the list of subjects of a YAML or CSV manifest (paths made absolute).

    YAML::

        params:              # shared parameters (any ``helm-dask run`` option, with underscores)
          spacing: 0.3
          k: 4-9
        subjects:
          - scan: sub01_scan.nii.gz          # paths relative to the manifest's folder
            hypothalamus: sub01_hypo.nii.gz
            side: R
            subject: sub01                    # optional; default: the scan's name
            mask: sub01_samseg.mgz            # optional: the subject's own brain mask (--mask)
            alpha: 1.0e-3                     # optional per-subject overrides

    CSV: a header with ``scan,hypothalamus,side`` and optionally ``subject``, ``mask`` and any parameter column.

    Keys are the options of ``helm-dask run`` with underscores (``k``, ``spacing``, ``no_qc``, ...; see
    :func:`manifest_keys`), plus ``scan``. Not keys: ``out`` (every subject writes to ``--out/<subject>``) and
    the compute options. ``scan``/``hypothalamus``/``mask`` may be URLs (``s3://bucket/sub01_scan.nii.gz``);
    ``--storage-options`` applies to every subject (a ``storage_options`` mapping in the manifest overrides
    it). The YAML is read with ``yaml.safe_load`` (no object construction from the file).

    Keys are checked here (an unknown key stops the batch with one line naming the manifest and the row, and the
    list of known ones); values, going through the same checks as the flags, by :func:`subject_params`.

    Parameters
    ----------
    path : path-like
        A ``.yaml``/``.yml`` or ``.csv`` file.

    Returns
    -------
    tuple
        ``(shared, subjects)``: the ``params:`` mapping and one dict per subject row.
    """
    p = Path(path)
    if not p.is_file():
        raise HelmError(
            "manifest not found" if not p.exists() else "manifest is not a file", path=p, hint="check the path"
        )
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HelmError(f"cannot read the manifest ({e})", path=p, hint="give a YAML or CSV text file") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        shared, subjects = _read_yaml(text, p)
    elif p.suffix.lower() == ".csv":
        shared, subjects = {}, _read_csv(text, p)
    else:
        raise HelmError("a manifest must end in .yaml, .yml or .csv", path=p)
    _check_rows(shared, subjects, p)
    return shared, subjects


def subject_params(
    base: RunParams, shared: dict, entry: dict, *, row: int | None = None, manifest: Any = None
) -> RunParams:
    """The RunParams of one manifest row: ``base`` (the command line), then ``params:``, then the row.

    Parameters
    ----------
    base : RunParams
        From the command line.
    shared : dict
        The manifest's ``params:``.
    entry : dict
        The row.
    row : int, optional
        Row number, for the error messages.
    manifest : path-like, optional
        The manifest, for the error messages.

    Returns
    -------
    RunParams
        Values checked and converted like the flags' arguments (HelmError naming the row otherwise).
    """
    known = manifest_keys()
    options = {}
    where = f"subject {row}" if row is not None else "manifest"
    for src in (shared, entry):
        for k, v in src.items():
            key = KEY_ALIASES.get(k, str(k).replace("-", "_"))
            if key not in known:
                _check_keys([k], where, manifest)
            if v is None or (isinstance(v, str) and v == "" and known[key].nargs != 0):
                continue
            try:
                options[key] = _value(key, v, known[key])
            except HelmError as e:
                raise HelmError(f"{where}: {e.message}", path=manifest, hint=e.hint or "fix the manifest") from None
    try:
        kw = run_params_kwargs(options)
    except HelmError as e:
        raise HelmError(f"{where}: {e.message}", path=manifest, hint=e.hint) from None
    if "subject" in kw:
        kw["subject"] = str(kw["subject"])
    return replace(base, **kw)


def plan_batch(manifest: str | os.PathLike, base: RunParams) -> list[tuple[int, RunParams]]:
    """Every row's RunParams, checked before anything runs.

    Keys, values and subject names are checked: a subject's name (``subject:``, default the scan's file name
    made a safe folder name) must be one safe path component, and no two rows may resolve to the same name
    (case-insensitively): they would write to the same folder and overwrite each other.

    Parameters
    ----------
    manifest : path-like
        The manifest (see :func:`load_manifest`).
    base : RunParams
        From the command line.

    Returns
    -------
    list of (int, RunParams)
        Row number (from 1) and parameters of every subject.
    """
    shared, subjects = load_manifest(manifest)
    plan = []
    for i, entry in enumerate(subjects, start=1):
        params = subject_params(base, shared, entry, row=i, manifest=manifest)
        try:
            params.subject_name()
        except HelmError as e:
            raise HelmError(f"subject {i}: {e.message}", path=manifest, hint=e.hint) from None
        plan.append((i, params))
    by_name: dict[str, list[int]] = {}
    for i, params in plan:
        # case-insensitive: on macOS and Windows file systems Sub01 and sub01 are the same folder
        by_name.setdefault(params.subject_name().lower(), []).append(i)
    clashes = [(plan[rows[0] - 1][1].subject_name(), rows) for rows in by_name.values() if len(rows) > 1]
    if clashes:
        text = "; ".join(f"rows {', '.join(map(str, rows))} are all named {name!r}" for name, rows in clashes)
        raise HelmError(
            f"two or more subjects would write to the same folder: {text}",
            path=manifest,
            hint="give each row its own 'subject:' (e.g. subject: sub01); a row without one is named "
            "after its scan's file name",
        )
    return plan


def run_batch(
    manifest: str | os.PathLike,
    base: RunParams,
    *,
    quiet: bool = False,
    debug: bool = False,
    plan: list | None = None,
    concurrent: int = 1,
) -> list[dict]:
    """Run every subject of a manifest, one after the other or ``concurrent`` at a time.

    The manifest is checked whole first (:func:`plan_batch`, or the ``plan`` it returned): a problem there raises
    :class:`HelmError` before any subject runs. A subject that fails while running (a bad file, a failed check)
    is reported on stderr and the others still run; every subject resumes stage by stage like a single run.

    With ``concurrent`` > 1, up to that many subjects run at once on the same scheduler, each in a client thread
    of this process with its own context (:func:`contextvars.copy_context`: its own stage progress and chunk
    cache owner), its stages still in order. Their output lines are prefixed with the subject's name and written
    whole (progress as one line per 10%, never a bar redrawn in place). Worker memory grows with the number of
    subjects at once: each holds its current stage's batches in the workers (:func:`concurrency_note`).

    Parameters
    ----------
    manifest : path-like
        The manifest (see :func:`load_manifest`).
    base : RunParams
        From the command line.
    quiet : bool
        No progress output.
    debug : bool
        Print the traceback of an internal error.
    plan : list, optional
        What :func:`plan_batch` returned, to skip checking again.
    concurrent : int
        Subjects run at once (``--concurrent-subjects``; 1: one after the other).

    Returns
    -------
    list of dict
        One summary row per subject, in the manifest's order (failures included): ``subject``, ``status``,
        ``seconds``, ``stages``, ...
    """
    if plan is None:
        plan = plan_batch(manifest, base)
    n = max(1, min(int(concurrent), len(plan)))
    if n == 1:
        return [_run_one(params, quiet=quiet, debug=debug) for _, params in plan]
    note = concurrency_note(n)
    if note and not quiet:
        print(f"helm-dask: {note}", file=sys.stderr, flush=True)
    return _run_concurrent([params for _, params in plan], n, quiet=quiet, debug=debug)


def _run_one(params: RunParams, *, quiet: bool, debug: bool) -> dict:
    """One subject's run and its summary row; a failure is reported on stderr and becomes a ``failed`` row."""
    t0 = time.perf_counter()
    name = params.subject_name()
    try:
        info = run_subject(params, quiet=quiet)
        return _summary_row(info, time.perf_counter() - t0)
    except HelmError as e:
        print(f"helm-dask: [{name}] failed: {e}", file=sys.stderr, flush=True)
        return {"subject": name, "status": f"failed: {e}", "seconds": round(time.perf_counter() - t0, 1), "stages": {}}
    except Exception as e:  # keep going: one broken subject must not stop the batch
        print(f"helm-dask: [{name}] internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if debug:
            traceback.print_exc()
        return {
            "subject": name,
            "status": f"failed: internal error {type(e).__name__}: {e}",
            "seconds": round(time.perf_counter() - t0, 1),
            "stages": {},
        }


# ----------------------------------------------------------------------------------------------------------------
# Concurrent subjects: client threads on one scheduler

#: The subject whose thread is running (its output lines get its name); empty outside a batch's subject thread.
_SUBJECT: ContextVar[str] = ContextVar("helm_dask_batch_subject", default="")
#: Seconds an interrupted batch waits for its subject threads to unwind (remove their temporaries, locks).
INTERRUPT_JOIN_S = 30.0


def concurrency_note(n: int) -> str | None:
    """A warning when ``n`` subjects at once exceed what the current scheduler has room for, else None.

    Every running subject keeps its current stage's batch of chunks (:data:`~helm_dask.io.store.STORE_BATCH_CHUNKS`
    output chunks and their inputs) in the workers' memory, and its client-side state (coarse copies, model fits,
    NIfTI export buffers) in this process, so memory grows about linearly with ``n``; throughput only grows while
    the workers have idle threads (one subject's client-side work, its stage boundaries and its scheduler round
    trips leave them idle). Subjects beyond the workers' threads mostly queue for them while holding memory.

    Parameters
    ----------
    n : int
        Subjects to run at once.

    Returns
    -------
    str or None
        The warning (a distributed client with fewer worker threads than ``n``), or None.

    Example
    -------
    >>> concurrency_note(1) is None
    True
    """
    if n <= 1 or dask.config.get("scheduler", None) in ("threads", "synchronous", "sync", "processes"):
        return None
    try:
        from distributed import get_client

        info = get_client().scheduler_info()
    except (ImportError, ValueError, OSError):
        return None  # an in-process scheduler: its threads are shared by the subjects' tasks
    workers = info.get("workers", {})
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    if n <= threads:
        return None
    return (
        f"--concurrent-subjects {n} exceeds the cluster's {threads} worker thread(s) ({len(workers)} worker(s)): "
        f"the extra subjects mostly wait for the same threads while their stages hold worker memory"
    )


class _SubjectLines:
    """A stream that writes a subject thread's output whole lines at a time, each prefixed with its name.

    Concurrent subjects print to the same stdout/stderr: a line is held until its newline (per thread), then
    written in one call under a lock, so that two subjects' lines never mix mid-line. Threads outside a subject
    (the main thread, Dask's) write through unchanged. Not a terminal (``isatty`` False): progress is one line
    per 10% instead of a bar redrawn in place, which several subjects would overwrite.
    """

    def __init__(self, stream: Any):
        self._stream = stream
        self._lock = threading.Lock()
        self._local = threading.local()

    def write(self, text: str) -> int:
        name = _SUBJECT.get()
        if not name:
            with self._lock:
                return self._stream.write(text)
        pending = getattr(self._local, "pending", "") + text.replace("\r", "\n")
        *lines, self._local.pending = pending.split("\n")
        if lines:
            tag = f"[{name}]"
            whole = "".join(f"{ln if tag in ln[: len(tag) + 12] else f'{tag} {ln}'}\n" for ln in lines if ln.strip())
            with self._lock:
                self._stream.write(whole)
                self._stream.flush()
        return len(text)

    def finish(self) -> None:
        """Write what this thread left without a newline."""
        if getattr(self._local, "pending", ""):
            self.write("\n")

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stream, attr)


def _run_concurrent(plan: list[RunParams], n: int, *, quiet: bool, debug: bool) -> list[dict]:
    """Run the subjects ``n`` at a time in daemon client threads; the rows in the plan's order."""
    rows: list[dict | None] = [None] * len(plan)
    todo = list(enumerate(plan))
    todo_lock = threading.Lock()
    stopping = threading.Event()
    out, err = _SubjectLines(sys.stdout), _SubjectLines(sys.stderr)

    def work() -> None:
        while not stopping.is_set():
            with todo_lock:
                if not todo:
                    return
                i, params = todo.pop(0)
            token = _SUBJECT.set(params.subject_name())
            try:
                with cache_owner(params.subject_name()):
                    rows[i] = _run_one(params, quiet=quiet, debug=debug)
            except BaseException:  # an interrupt raised in this thread by the main one: unwound, nothing to report
                return
            finally:
                out.finish()
                err.finish()
                _SUBJECT.reset(token)

    # each thread its own copy of this context: stage progress and cache owners are context variables
    done = [threading.Event() for _ in range(n)]
    threads = [
        threading.Thread(
            target=contextvars.copy_context().run, args=(_signalling, work, ev), name=f"helm-subject-{k}", daemon=True
        )
        for k, ev in enumerate(done)
    ]
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        for t in threads:
            t.start()
        for ev in done:
            # a timed wait on an event, not Thread.join: an interrupted join marks a running thread as stopped
            # (Python < 3.13), and Ctrl-C must reach this thread
            while not ev.wait(0.5):
                pass
    except BaseException as e:
        stopping.set()
        _interrupt(threads, done, type(e))
        raise
    finally:
        sys.stdout, sys.stderr = saved
    return [r for r in rows if r is not None]


def _signalling(work: Callable[[], None], done: threading.Event) -> None:
    try:
        work()
    finally:
        done.set()


def _interrupt(threads: list[threading.Thread], done: list[threading.Event], exc: type[BaseException]) -> None:
    """Raise ``exc`` in every running subject thread and wait (at most :data:`INTERRUPT_JOIN_S`) for them to
    unwind: their ``finally`` blocks release the subjects' locks and temporaries as a sequential run's would."""
    for t, ev in zip(threads, done):
        if not ev.is_set() and t.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(exc))
    deadline = time.monotonic() + INTERRUPT_JOIN_S
    for ev in done:
        ev.wait(max(0.0, deadline - time.monotonic()))


def _summary_row(info: dict, seconds: float) -> dict:
    row = {
        "subject": info["subject"],
        "status": "ok",
        "seconds": round(seconds, 1),
        "stages": {k: v["seconds"] for k, v in info.get("stages", {}).items()},
        "skipped": [k for k, v in info.get("stages", {}).items() if v["status"] == "skipped"],
    }
    tr = info.get("transform")
    if tr:
        row["overlap_fraction"] = tr.get("fraction_across")
        row["gap_mm"] = tr.get("gap_mm")
    km = info.get("kmeans")
    if km:
        first = next(iter(km.values()))
        row["mask_voxels"] = first.get("n_voxels")
    row["mask_mm3"] = info.get("mask_mm3")
    return row


def format_summary(rows: list[dict]) -> str:
    """The summary rows of :func:`run_batch` as an aligned text table.

    Parameters
    ----------
    rows : list of dict
        From :func:`run_batch`.

    Returns
    -------
    str
        One line per subject: seconds per stage, mask volume, mirror overlap, status.

    Example
    -------
    >>> print(format_summary([{"subject": "s1", "status": "ok", "stages": {"mask": 1.25}, "mask_mm3": 1e5}]))
    subject  mask s  mask mm3  overlap  status
    -------  ------  --------  -------  ------
    s1       1.2     100,000   -        ok
    """
    stages = []
    for r in rows:
        for s in r.get("stages", {}):
            if s not in stages:
                stages.append(s)
    head = ["subject", *[f"{s} s" for s in stages], "mask mm3", "overlap", "status"]
    lines = []
    for r in rows:
        ov = r.get("overlap_fraction")
        vol = r.get("mask_mm3")
        lines.append(
            [
                r["subject"],
                *[f"{r['stages'][s]:.1f}" if s in r.get("stages", {}) else "-" for s in stages],
                f"{vol:,.0f}" if isinstance(vol, (int, float)) else "-",
                f"{ov:.2e}" if isinstance(ov, (int, float)) else "-",
                r["status"],
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])
