"""Where the Dask work runs: every command that computes goes through :func:`compute_context`, which starts a
``dask.distributed`` LocalCluster of worker processes with a memory limit each (the default, so that a stage's
memory bound is enforced and measurable), joins a running cluster (``--scheduler tcp://HOST:PORT`` or a
scheduler JSON file; TLS with mutual authentication through ``--tls-*``, :func:`security_from_options`), or
runs in this process (``--scheduler threads`` / ``synchronous``); connection failures become one
:class:`~helm_dask.errors.HelmError` line naming the address and the fix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import ssl
import sys
import warnings
from dataclasses import dataclass
from typing import Any, cast

import dask

from .errors import HelmError

LOCAL_SCHEDULERS = ("threads", "synchronous")
#: How long to wait for a scheduler to accept us; short, so that a wrong address fails fast.
CONNECT_TIMEOUT = "10s"
_TLS_HINT = (
    "pass --tls-ca/--tls-cert/--tls-key (or set distributed.comm.tls.* in a Dask config file, "
    "e.g. one named by DASK_CONFIG)"
)


@dataclass
class ClusterOptions:
    """How to reach (or start) the Dask cluster; the ``compute`` options of every computing command."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    dashboard: str = "127.0.0.1:0"  # localhost only unless asked otherwise
    quiet: bool = False
    tls_ca: str | None = None  # PEM file of the CA that signed the cluster's certificates
    tls_cert: str | None = None  # PEM certificate this process presents (may also hold the key)
    tls_key: str | None = None  # PEM private key of tls_cert
    connect_timeout: str = CONNECT_TIMEOUT

    @classmethod
    def from_args(cls, args: Any) -> ClusterOptions:
        """Options from an ``argparse`` namespace built with the CLI's compute options.

        Parameters
        ----------
        args : argparse.Namespace
            Parsed command line; missing options take their defaults.

        Returns
        -------
        ClusterOptions
        """
        get = lambda name, default=None: getattr(args, name, default)
        return cls(
            scheduler=get("scheduler"),
            workers=get("workers"),
            threads_per_worker=get("threads_per_worker"),
            memory_limit=get("memory_limit"),
            dashboard=get("dashboard_address") or "127.0.0.1:0",
            quiet=bool(get("quiet", False)),
            tls_ca=get("tls_ca"),
            tls_cert=get("tls_cert"),
            tls_key=get("tls_key"),
        )


def default_workers() -> int:
    """Worker processes of a LocalCluster when ``--workers`` is not given.

    Returns
    -------
    int
        The number of CPUs, capped at 2 (each worker holds its own memory limit).
    """
    return max(1, min(2, os.cpu_count() or 1))


#: The smallest ``--memory-limit`` accepted. A worker process with helm-dask's modules loaded holds ~250 MB
#: before any data, and distributed pauses a worker at 80% of its limit: with less than this, a worker can be
#: paused for good before its first task and the run waits forever. Working sizes are GB (see deploy/).
MIN_WORKER_MEMORY = 512 * 2**20


def parse_memory_limit(text: str) -> str:
    """Check a ``--memory-limit`` value.

    Parameters
    ----------
    text : str
        ``auto`` or a size (``4GB``, ``3.5GiB``, ``2000000000``) of at least :data:`MIN_WORKER_MEMORY`.

    Returns
    -------
    str
        ``text`` unchanged (``"auto"`` in any case); :class:`ValueError` with the reason otherwise.

    Example
    -------
    >>> parse_memory_limit("4GB")
    '4GB'
    """
    from dask.utils import parse_bytes

    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = parse_bytes(str(text))
    except (ValueError, TypeError):
        raise ValueError(f"is not a size like 4GB or 3.5GiB (or auto): {text!r}") from None
    if n < MIN_WORKER_MEMORY:
        raise ValueError(
            f"{text!r} is below the minimum of {MIN_WORKER_MEMORY // 2**20} MiB per worker (a worker "
            f"holds ~250 MB before any data and pauses at 80% of its limit)"
        )
    return str(text)


#: glibc's ``M_MMAP_THRESHOLD`` in a worker: blocks up to this size come from malloc's heap, larger ones from
#: fresh mappings of their own (see :func:`keep_freed_memory`).
MMAP_THRESHOLD_BYTES = 32 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def _libc() -> Any:
    """The C library, loaded once. By its name, not ``ctypes.util.find_library``: that runs ``ldconfig`` in a
    child process, and a fork of a worker every second showed up as a second worker's worth of RSS."""
    return ctypes.CDLL("libc.so.6")


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel block by block
    (glibc's ``M_MMAP_THRESHOLD`` raised to :data:`MMAP_THRESHOLD_BYTES`); False where malloc is not glibc's.

    Why: ``distributed`` starts its workers with ``MALLOC_TRIM_THRESHOLD_`` set, which fixes glibc's mmap
    threshold at 128 KiB, so every chunk-sized buffer (a decoded 128^3 chunk is 2-8 MB) is a new mapping whose
    pages the kernel maps and zeroes one fault at a time, and unmaps when it is freed. A 0.2 mm template run took
    52 M page faults and 145 s of kernel time in 224 s; with the threshold at 32 MiB, 5.7 M and 44 s, and 173 s.
    The price is memory a fragmented heap keeps: the workers hand it back with :func:`trim_memory` every
    :data:`TRIM_EVERY_MS` and between stages.

    Returns
    -------
    bool
    """
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator, left as it is
        return False


#: How often a worker hands its freed memory back to the kernel (:func:`trim_memory`): memory kept for reuse
#: (:func:`keep_freed_memory`) costs no page faults, but the heap fragments, and without trims the workers'
#: peaks of a 0.2 mm template run rose by ~200 MB each. A trim frees only what is free at that moment, so kept
#: memory lives at most this long; it is skipped while less than :data:`TRIM_MIN_FREE_BYTES` is free.
TRIM_EVERY_MS = 1000
TRIM_MIN_FREE_BYTES = 64 * 2**20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def free_heap_bytes() -> int | None:
    """The bytes of freed memory in glibc's malloc heaps of this process (``mallinfo2().fordblks``: kept for
    reuse, or already handed back by a trim), or None where malloc is not glibc's (or older than 2.33).

    Returns
    -------
    int or None
    """
    try:
        fn = _libc().mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def _periodic_trim() -> None:
    free = free_heap_bytes()
    if free is not None and free > TRIM_MIN_FREE_BYTES:
        trim_memory()


def trim_memory() -> bool:
    """Hand the freed memory of this process back to the kernel (glibc's ``malloc_trim(0)``); False where malloc
    is not glibc's. Each worker runs it every :data:`TRIM_EVERY_MS`, and the pipeline on every worker between
    stages (:func:`trim_workers`).

    Returns
    -------
    bool
    """
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


def trim_workers(client: Any) -> None:
    """:func:`trim_memory` on every worker of ``client`` (nothing when a worker cannot: it keeps its memory).

    Parameters
    ----------
    client : distributed.Client or None
    """
    if client is None:
        return
    with contextlib.suppress(Exception):  # best effort: a worker that went away, or a cluster without helm_dask
        client.run(trim_memory)


def dask_setup(worker: Any) -> None:
    """Preload of the LocalCluster's worker processes (``distributed`` calls it in each one, restarts too).

    Ctrl-C in a terminal reaches every process of the job: the workers must leave it to the command, which
    stops them in order (see :func:`helm_dask.io.store.stop_pending_writes`); otherwise each one dies with a
    traceback of its own, possibly in the middle of a chunk write. Freed memory is kept for reuse
    (:func:`keep_freed_memory`) and handed back every :data:`TRIM_EVERY_MS`.

    Parameters
    ----------
    worker : distributed.Worker
        The worker being set up (its periodic callbacks get a :func:`trim_memory` every :data:`TRIM_EVERY_MS`).
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if keep_freed_memory() and free_heap_bytes() is not None:
        from tornado.ioloop import PeriodicCallback

        # started with the worker's own periodic callbacks, stopped with them when it closes
        worker.periodic_callbacks["helm-dask-trim"] = PeriodicCallback(_periodic_trim, TRIM_EVERY_MS)


def security_from_options(opts: ClusterOptions) -> Any:
    """The ``distributed.security.Security`` of ``--tls-ca/--tls-cert/--tls-key``, or None without them.

    With the flags every connection is TLS with mutual authentication: encryption is required and the same
    certificate serves as client, scheduler and worker certificate (the client presents it to the scheduler,
    and a LocalCluster started here listens on ``tls://`` with the same files). Without them,
    distributed's own configuration applies (``distributed.comm.tls.*`` and
    ``distributed.comm.require-encryption`` in a Dask config file, e.g. one named by ``DASK_CONFIG``), so a
    site-wide TLS setup needs no flags. The files are loaded once here so that a wrong path or a key that does
    not match is reported up front.

    Parameters
    ----------
    opts : ClusterOptions
        Its ``tls_ca``, ``tls_cert`` and ``tls_key``.

    Returns
    -------
    distributed.security.Security or None
        None means "distributed's configuration decides".

    Example
    -------
    >>> security_from_options(ClusterOptions()) is None
    True
    """
    if not (opts.tls_ca or opts.tls_cert or opts.tls_key):
        return None
    if not (opts.tls_ca and opts.tls_cert):
        raise HelmError(
            "TLS needs at least --tls-ca and --tls-cert (and --tls-key unless the key is inside the certificate file)",
            hint="pass all three, e.g. --tls-ca ca.pem --tls-cert me.pem --tls-key me.key",
        )
    for flag, path in (("--tls-ca", opts.tls_ca), ("--tls-cert", opts.tls_cert), ("--tls-key", opts.tls_key)):
        if path is not None and not os.path.isfile(path):
            raise HelmError(f"{flag} file not found", path=path, hint="give the path of a PEM file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=opts.tls_ca)
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise HelmError(
            f"cannot load the TLS files ({e})",
            path=opts.tls_cert,
            hint="--tls-ca must be the CA's PEM certificate, --tls-cert a PEM certificate and "
            "--tls-key its unencrypted PEM private key",
        ) from None
    from distributed.security import Security

    cert, key = opts.tls_cert, opts.tls_key
    return Security(
        tls_ca_file=opts.tls_ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        require_encryption=True,
    )


def scheduler_address(target: str) -> str:
    """The address of ``--scheduler``: itself, or the ``address`` field of a scheduler JSON file.

    Parameters
    ----------
    target : str
        An address (a bare ``HOST:PORT`` is TCP, as in distributed) or a scheduler file (parsed as JSON, never
        unpickled).

    Returns
    -------
    str
        The address.

    Example
    -------
    >>> scheduler_address("tcp://10.0.0.5:8786")
    'tcp://10.0.0.5:8786'
    """
    if os.path.isfile(target):
        try:
            with open(target, encoding="utf-8") as f:
                address = json.load(f)["address"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HelmError(
                f"not a Dask scheduler file ({type(e).__name__}: {e})",
                path=target,
                hint="give the file written by `dask scheduler --scheduler-file FILE`, or an address "
                "like tcp://HOST:8786",
            ) from None
        if not isinstance(address, str) or not address:
            raise HelmError(
                "the scheduler file has no address",
                path=target,
                hint="give the file written by `dask scheduler --scheduler-file FILE`",
            )
        return address
    if "://" not in target and (target.endswith(".json") or os.sep in target):
        raise HelmError(
            "scheduler file not found",
            path=target,
            hint="start the scheduler with --scheduler-file, or give its address like tcp://HOST:8786",
        )
    return target


def _connection_error(address: str, exc: BaseException, timeout: str) -> HelmError:
    """Translate distributed's connection failures into one line naming the address and the fix."""
    from distributed.comm.core import CommClosedError, FatalCommClosedError

    secure = address.startswith("tls://")
    text = str(exc)
    chain = [exc]
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    causes = tuple(type(c) for c in chain)
    if isinstance(exc, TypeError) and "ssl_context" in text:
        # distributed's message for a tls:// address without any TLS configuration
        return HelmError(f"scheduler {address} requires TLS but no certificates were given", hint=_TLS_HINT)
    if isinstance(exc, RuntimeError) and "encryption required" in text:
        return HelmError(
            f"TLS is required (--tls-* or distributed.comm.require-encryption) but scheduler address "
            f"{address} is not tls://",
            hint="use the tls:// address the scheduler prints (or its scheduler file)",
        )
    if isinstance(exc, FatalCommClosedError) or any(issubclass(c, ssl.SSLError) for c in causes):
        detail = next((str(c) for c in chain if isinstance(c, ssl.SSLError)), text)
        return HelmError(
            f"TLS handshake with scheduler {address} failed ({detail.strip()})",
            hint="check that --tls-ca is the CA that signed the cluster's certificates and that "
            "--tls-cert/--tls-key were signed by it; a scheduler without TLS needs tcp:// and no "
            "--tls-* flags",
        )
    if any(issubclass(c, ConnectionRefusedError) for c in causes):
        return HelmError(
            f"no Dask scheduler at {address} (connection refused)",
            hint="start one (`dask scheduler`) or fix --scheduler (tcp://HOST:PORT or a scheduler file)",
        )
    if not secure and any(issubclass(c, (ConnectionResetError, CommClosedError)) for c in causes):
        # a TLS scheduler drops a plain-TCP client as soon as it sees no TLS hello
        return HelmError(
            f"scheduler {address} refused the connection: it probably requires TLS",
            hint=f"connect to tls://{address.split('://')[-1]} and {_TLS_HINT}",
        )
    if isinstance(exc, (OSError, TimeoutError)):
        return HelmError(
            f"scheduler {address} did not answer within {timeout} ({text})",
            hint="check the address, that the scheduler is running and reachable (firewall), and "
            "for a TLS scheduler the tls:// scheme and the --tls-* files",
        )
    return HelmError(
        f"cannot connect to scheduler {address} ({type(exc).__name__}: {text})",
        hint="check --scheduler and the --tls-* options",
    )


def connect_client(opts: ClusterOptions) -> Any:
    """A ``distributed.Client`` connected to a running scheduler, within ``opts.connect_timeout``.

    Parameters
    ----------
    opts : ClusterOptions
        ``scheduler`` (an address or a scheduler file) and the TLS options.

    Returns
    -------
    distributed.Client
        Connected; a scheduler that refuses us or does not answer raises one HelmError line naming the address
        and the fix.
    """
    from distributed import Client

    address = scheduler_address(cast(str, opts.scheduler))  # callers come here only with a scheduler given
    security = security_from_options(opts)
    kw = {"security": security} if security is not None else {}
    try:
        return Client(address, timeout=opts.connect_timeout, **kw)
    except Exception as e:
        err = _connection_error(address, e, opts.connect_timeout)
    # The half-built Client (kept alive by the traceback) would print a traceback from its __del__ at exit
    # (distributed's Client.close on a client that never connected): collect it now, quietly.
    import gc

    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise err


def start_local_cluster(opts: ClusterOptions) -> Any:
    """A LocalCluster of worker processes sized by ``opts`` (TLS with the ``--tls-*`` files if given).

    Parameters
    ----------
    opts : ClusterOptions
        Workers, threads per worker, memory limit, dashboard address (localhost unless asked otherwise), TLS.

    Returns
    -------
    distributed.LocalCluster
    """
    from distributed import LocalCluster

    security = security_from_options(opts)
    kw = {"security": security, "protocol": "tls://"} if security is not None else {}
    # security=None lets distributed read its config: distributed.comm.require-encryption turns on tls:// there.
    # Worker logs stay quiet: a failed task reaches the command as its exception, reported there in one line.
    # The worker processes start with SIGINT ignored (a disposition children inherit, and then keep: Python
    # installs its KeyboardInterrupt handler only over the default); dask_setup keeps it so after a restart.
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return LocalCluster(
            n_workers=opts.workers or default_workers(),
            threads_per_worker=opts.threads_per_worker or 1,
            memory_limit=opts.memory_limit or "auto",
            processes=True,
            host="127.0.0.1",
            dashboard_address=opts.dashboard,
            silence_logs=logging.CRITICAL,
            preload=["helm_dask.cluster"],
            **kw,
        )
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


#: How long the dashboard may take to answer before the run goes on without its link (its first page takes
#: ~0.4 s to render on the reference machine).
DASHBOARD_PROBE_S = 5.0


def dashboard_status(link: str, timeout_s: float = DASHBOARD_PROBE_S) -> str:
    """Whether a Dask dashboard link leads to the dashboard: ``"ok"``, ``"no-bokeh"`` (distributed serves a page
    saying "Dask needs bokeh" when the scheduler lacks it), ``"missing"`` (the scheduler's web server answers
    without a dashboard page, e.g. ``dask scheduler --no-dashboard``) or ``"unreachable"``.

    Parameters
    ----------
    link : str
        The dashboard's URL (``client.dashboard_link``).
    timeout_s : float
        How long to wait for the page.

    Returns
    -------
    str

    Examples
    --------
    >>> dashboard_status("http://127.0.0.1:9/status", timeout_s=0.5)
    'unreachable'
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(link, timeout=timeout_s) as r:
            page = r.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError:  # an answer, but not a page (404 without a dashboard)
        return "missing"
    except (OSError, ValueError):
        return "unreachable"
    return "no-bokeh" if "needs bokeh" in page else "ok"


def _dashboard_link(client) -> str:
    """The dashboard's link, checked by fetching it: only a page that is the dashboard is offered."""
    try:
        if client.cluster is None and "dashboard" not in client.scheduler_info().get("services", {}):
            return "(no dashboard)"
        link = client.dashboard_link
    except Exception:
        return "(no dashboard)"
    if not link:
        return "(no dashboard)"
    status = dashboard_status(link)
    if status == "missing":
        return "(no dashboard)"
    if status == "no-bokeh":
        return "(none: the scheduler lacks bokeh; `pip install bokeh` where it runs)"
    if status == "unreachable":
        return f"{link} (did not answer from this machine)"
    return link


def _run_error(exc: BaseException, address: str, client) -> HelmError | None:
    """A failure of the cluster during a run, as one line; None for anything else (re-raised as is)."""
    import concurrent.futures

    from distributed import KilledWorker
    from distributed.comm.core import CommClosedError

    if isinstance(exc, KilledWorker):
        return HelmError(
            f"a task failed repeatedly because the workers running it died ({exc})",
            hint="workers were killed or ran out of memory: raise --memory-limit or lower "
            "--threads-per-worker, then rerun (finished stages are reused)",
        )
    lost = client.status != "running"  # the client gave up reconnecting (it cancels every future then)
    if isinstance(exc, CommClosedError) or (
        lost and isinstance(exc, (concurrent.futures.CancelledError, OSError, TimeoutError))
    ):
        return HelmError(
            f"lost the connection to scheduler {address} ({type(exc).__name__})",
            hint="check that the scheduler is still running, then rerun: finished stages are reused, "
            "nothing half-written is kept",
        )
    return None


class _DropAllExit(logging.Filter):
    """Drop asyncio's "Task exception was never retrieved ... AllExit": the client's gather tasks of a computation
    that was interrupted are collected with that internal signal of distributed's; nothing failed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "AllExit"


_ALL_EXIT_FILTER = _DropAllExit()


def fold_aliases(dsk: Any, keys: Any) -> dict:
    """``dsk`` with every alias that alone refers to a task replaced by that task, under the alias's key.

    Dask's linear fusion gives each fused chain a new key and keeps the chain's last key as an alias of it, so
    every chunk a stage computes costs two tasks on a distributed scheduler (the alias moves nothing, but it is
    scheduled, sent, run and reported like any task). Folding the alias into the task it names keeps one task
    per chunk: the same functions on the same inputs under the keys the graph's users know.

    Parameters
    ----------
    dsk : mapping
        A low-level graph of task-spec nodes (what ``dask.array.optimization.optimize`` returns).
    keys : list
        The keys asked for (never folded away).

    Returns
    -------
    dict

    Example
    -------
    >>> from dask._task_spec import Alias, Task
    >>> g = fold_aliases({"x": Alias("x", "fused-x"), "fused-x": Task("fused-x", sum, [1, 2])}, ["x"])
    >>> list(g), g["x"]()
    (['x'], 3)
    """
    from dask._task_spec import Alias, GraphNode, Task

    out = dict(dsk)
    wanted = set(_flat_keys(keys))
    refs: dict = {}
    for node in out.values():
        for d in getattr(node, "dependencies", ()):
            refs[d] = refs.get(d, 0) + 1
    for key, node in list(out.items()):
        if not isinstance(node, Alias) or node.target == key:
            continue
        target = out.get(node.target)
        if not isinstance(target, Task) or node.target in wanted or refs.get(node.target) != 1:
            continue
        renamed = target.substitute({}, key=key)
        assert isinstance(renamed, GraphNode)
        out[key] = renamed
        del out[node.target]
    return out


def _flat_keys(keys: Any) -> list:
    from dask.core import flatten

    return list(flatten(keys if isinstance(keys, (list, set)) else [keys]))


def optimize_arrays(dsk: Any, keys: Any, **kwargs: Any) -> dict:
    """Dask's array optimisation followed by :func:`fold_aliases`: the ``array_optimize`` of
    :func:`compute_context`.

    Why: at 0.1 mm the mirror stage ran 12,776 tasks, 5,920 of them aliases of 0.03 ms each (one per chunk
    written and per pyramid chunk); each task costs the client, the scheduler and a worker's event loop a few
    milliseconds of the same two cores the tasks run on.
    """
    from dask.array.optimization import optimize

    return fold_aliases(optimize(dsk, keys, **kwargs), keys)


@contextlib.contextmanager
def compute_context(opts: ClusterOptions | None = None):
    """Context manager yielding a ``distributed.Client`` (or None for in-process schedulers).

    A cluster that fails during the run (workers killed, the scheduler lost) is reported as one HelmError line;
    a cluster started here is closed on exit.

    Parameters
    ----------
    opts : ClusterOptions, optional
        Where to run; default a LocalCluster sized automatically.

    Yields
    ------
    distributed.Client or None

    Example
    -------
    >>> with compute_context(ClusterOptions(scheduler="threads")) as client:
    ...     print(client)
    None
    """
    opts = opts or ClusterOptions()
    # Stages ship small fitted models (the bag-removal coarse model is ~35 MB, whatever the volume size) once per
    # graph; distributed's advice about large graphs is not actionable for users, so keep it out of their output.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    logging.getLogger("asyncio").addFilter(_ALL_EXIT_FILTER)  # idempotent: one filter object
    if opts.scheduler in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=opts.scheduler, array_optimize=optimize_arrays):
            yield None
        return

    if opts.scheduler:
        client = connect_client(opts)
        cluster = None
    else:
        cluster = start_local_cluster(opts)
        client = _client_for(cluster, opts)
    address = client.scheduler.address
    try:
        if not opts.quiet:
            nthreads = client.nthreads()
            print(
                f"dask: {len(nthreads)} worker(s), {sum(nthreads.values())} thread(s) at {address}; "
                f"dashboard {_dashboard_link(client)}",
                file=sys.stderr,
                flush=True,
            )
        try:
            with dask.config.set(array_optimize=optimize_arrays):
                yield client
        except Exception as e:
            err = _run_error(e, address, client)
            if err is None:
                raise
            raise err from None
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def _client_for(cluster, opts: ClusterOptions):
    from distributed import Client

    try:
        return Client(cluster, timeout=opts.connect_timeout)
    except BaseException:
        cluster.close()
        raise
