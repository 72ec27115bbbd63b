"""Where files and stores live -- local paths or fsspec URLs (``s3://bucket/key.zarr``) -- and how outputs get
there whole or not at all: names (:func:`join`, :func:`name`, :func:`parent`), storage options
(:func:`parse_storage_options`, :func:`use_storage_options`), queries and whole-file I/O (:func:`exists`,
:func:`open_read`, :func:`open_write`, :func:`write_text_atomic`, :func:`copy_file`), atomic outputs
(:func:`atomic_path`, :func:`remove_live_temporaries`), one writer per output folder (:func:`exclusive`) and the
fault-injection hook of the failure tests (:func:`fault`); the method (where options come from, atomicity on
object stores, cleanup after an interrupt) is described in ``docs/method/storage.md``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import IO, Any

from ..errors import HelmError

_DEFAULT_OPTIONS: dict | None = None


# ----------------------------------------------------------------------------------------------------------------
# Names


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``, ``gs://...``, ``memory://...``) rather than a local path.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    bool

    Example
    -------
    >>> is_url("s3://bucket/scan.zarr"), is_url("out/scan.zarr")
    (True, False)
    """
    return "://" in os.fspath(path)


def join(base, *parts: str) -> str:
    """``base / part / ...``: :class:`pathlib.Path` joining for local paths, ``/``-joining for URLs.

    Parameters
    ----------
    base : str or path-like
        A local folder or a URL.
    *parts : str
        Components to append.

    Returns
    -------
    str

    Example
    -------
    >>> join("s3://bucket/out/", "sub01", "helm.zarr"), join("out", "sub01")
    ('s3://bucket/out/sub01/helm.zarr', 'out/sub01')
    """
    if not is_url(base):
        return str(Path(base, *parts))
    out = os.fspath(base).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def name(path) -> str:
    """The last component of a path or URL.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    str

    Example
    -------
    >>> name("s3://bucket/sub01/scan.nii.gz"), name("out/helm.zarr/")
    ('scan.nii.gz', 'helm.zarr')
    """
    return posixpath.basename(os.fspath(path).rstrip("/")) if is_url(path) else Path(path).name


def parent(path) -> str:
    """The folder holding ``path`` (a URL stays a URL).

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    str

    Example
    -------
    >>> parent("s3://bucket/sub01/scan.nii.gz"), parent("out/sub01")
    ('s3://bucket/sub01', 'out')
    """
    p = os.fspath(path)
    if is_url(p):
        proto, rest = p.split("://", 1)
        return f"{proto}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(p).parent)


def absolute(path) -> str:
    """An absolute local path, or the URL unchanged.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    str

    Example
    -------
    >>> absolute("s3://bucket/x"), os.path.isabs(absolute("x"))
    ('s3://bucket/x', True)
    """
    return os.fspath(path) if is_url(path) else os.path.abspath(path)


def writer_token() -> str:
    """A unique token that also names this writer: ``<random>p<pid>h<host hash>``.

    A sweep of leftovers can then tell a killed writer's temporaries from those of a writer that is still running
    (see :func:`remove_stale_siblings`). The random part must differ between calls: it is a temporary's name.

    Returns
    -------
    str

    Example
    -------
    >>> bool(_TOKEN.fullmatch("-" + writer_token()))
    True
    """
    return f"{uuid.uuid4().hex[:8]}p{os.getpid()}h{_HOST}"


def sibling(path, prefix: str, suffix: str = "") -> str:
    """A hidden, unique name next to ``path``: ``<parent>/.<name><prefix>-<writer token><suffix>``.

    Parameters
    ----------
    path : str or path-like
        The output the sibling belongs to.
    prefix, suffix : str
        Put before and after the writer token (:func:`writer_token`).

    Returns
    -------
    str

    Example
    -------
    >>> sibling("s3://b/out.nii.gz", ".tmp").startswith("s3://b/.out.nii.gz.tmp-")
    True
    """
    return join(parent(path), f".{name(path)}{prefix}-{writer_token()}{suffix}")


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TOKEN = re.compile(r"-[0-9a-f]{8}p(\d+)h([0-9a-f]{8})")
#: a temporary of a writer on another host (shared filesystem) is left alone for this long (its pid cannot be
#: checked from here); older ones are a killed writer's
FOREIGN_WRITER_GRACE_S = 24 * 3600


def _writer_alive(leftover: str, mtime: float | None) -> bool:
    """Whether the temporary ``leftover`` (a file name) may belong to a writer that is still running."""
    m = _TOKEN.search(leftover)
    if m is None:  # no writer recorded (older helm-dask): a killed writer's, as before
        return False
    pid, host = int(m.group(1)), m.group(2)
    if host != _HOST:
        return mtime is None or time.time() - mtime < FOREIGN_WRITER_GRACE_S
    if pid == os.getpid():
        return False  # this process has no write of this output in flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# Storage options


def parse_storage_options(text: str | dict | None) -> dict | None:
    """``--storage-options`` JSON (or ``@file.json``, or a dict) as a dict.

    ``@file.json`` keeps credentials off the command line (where other users could see them in ``ps``).

    Parameters
    ----------
    text : str, dict or None
        A JSON object, ``@`` and the path of a file holding one, a dict (copied), or None / ``""``.

    Returns
    -------
    dict or None
        None for no options; :class:`HelmError` if ``text`` is not a JSON object.

    Example
    -------
    >>> parse_storage_options('{"endpoint_url": "http://127.0.0.1:9000"}')
    {'endpoint_url': 'http://127.0.0.1:9000'}
    """
    if text is None or text == "":
        return None
    if isinstance(text, dict):
        return dict(text)
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise HelmError(
                f"cannot read the storage options file ({e.strerror or e})",
                path=text[1:],
                hint="give --storage-options JSON or @FILE with a JSON object",
            ) from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise HelmError(
            f"--storage-options is not valid JSON ({e})",
            hint='e.g. --storage-options \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
        ) from None
    if not isinstance(value, dict):
        raise HelmError(
            "--storage-options must be a JSON object of fsspec options",
            hint='e.g. --storage-options \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
        )
    return value


@contextlib.contextmanager
def use_storage_options(options: dict | None) -> Iterator[None]:
    """Make ``options`` the default for URLs opened without explicit ``storage_options`` (in this process).

    Parameters
    ----------
    options : dict or None
        fsspec options; None clears the default for the block.

    Example
    -------
    >>> with use_storage_options({"anon": True}):
    ...     options_for()
    {'anon': True}
    """
    global _DEFAULT_OPTIONS
    old = _DEFAULT_OPTIONS
    _DEFAULT_OPTIONS = dict(options) if options else None
    try:
        yield
    finally:
        _DEFAULT_OPTIONS = old


def options_for(storage_options: dict | None = None) -> dict:
    """The options in force: the explicit ones, else the process default, else none (fsspec config/env).

    Parameters
    ----------
    storage_options : dict, optional

    Returns
    -------
    dict
        A copy.

    Example
    -------
    >>> options_for({"anon": True}), options_for()
    ({'anon': True}, {})
    """
    if storage_options is not None:
        return dict(storage_options)
    return dict(_DEFAULT_OPTIONS or {})


def filesystem(url, storage_options: dict | None = None):
    """An fsspec filesystem for a URL, built with the options in force.

    Parameters
    ----------
    url : str
    storage_options : dict, optional

    Returns
    -------
    fs : fsspec.AbstractFileSystem
    path : str
        ``url`` as a path inside ``fs``.
    """
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(os.fspath(url), **options_for(storage_options))
    except (ValueError, ImportError) as e:
        raise HelmError(
            f"cannot open this URL ({e})",
            path=url,
            hint="use a local path or an fsspec URL such as s3://bucket/key (needs s3fs)",
        ) from None
    except TypeError as e:
        raise HelmError(
            f"the storage options do not fit this file system ({e})",
            path=url,
            hint="check --storage-options (see the s3fs / fsspec documentation)",
        ) from None
    return fs, p


def _remote_error(e: BaseException, path, doing: str) -> HelmError:
    """A one-line :class:`HelmError` for the usual object-store failures."""
    if isinstance(e, FileNotFoundError):
        return HelmError("not found", path=path, hint="check the URL (bucket and key)")
    if isinstance(e, PermissionError) or type(e).__name__ in ("NoCredentialsError", "ClientError"):
        return HelmError(
            f"access denied while {doing} ({e})",
            path=path,
            hint="check the credentials and endpoint: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL or --storage-options '{\"endpoint_url\": ...}'",
        )
    return HelmError(
        f"object storage error while {doing} ({type(e).__name__}: {e})",
        path=path,
        hint="check the URL, the endpoint and the credentials (--storage-options)",
    )


_REMOTE_ERRORS = (OSError, ValueError)


def _fresh(fs, p: str) -> None:
    # s3fs caches directory listings per filesystem instance; Zarr writes through another (asynchronous)
    # instance, so a listing cached here could hide what it wrote. Existence checks must see the store as it is.
    with contextlib.suppress(Exception):
        fs.invalidate_cache(p)


# ----------------------------------------------------------------------------------------------------------------
# Queries


def _remote_query(path, storage_options: dict | None, method: str, doing: str, **kw):
    """``fs.<method>(key, **kw)`` on a fresh listing; remote failures become one-line errors naming ``doing``."""
    fs, p = filesystem(path, storage_options)
    _fresh(fs, p)
    try:
        return getattr(fs, method)(p, **kw)
    except _REMOTE_ERRORS as e:
        raise _remote_error(e, path, doing) from None


def exists(path, storage_options: dict | None = None) -> bool:
    """Whether a file, folder or store (any object under the prefix) exists.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    bool

    Example
    -------
    >>> exists(os.curdir), exists("no such file here")
    (True, False)
    """
    if not is_url(path):
        return os.path.exists(path)
    return bool(_remote_query(path, storage_options, "exists", "checking whether it exists"))


def isdir(path, storage_options: dict | None = None) -> bool:
    """Whether ``path`` is a folder (a prefix with objects under it, on object stores).

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    bool
    """
    if not is_url(path):
        return os.path.isdir(path)
    return bool(_remote_query(path, storage_options, "isdir", "listing it"))


def size(path, storage_options: dict | None = None) -> int:
    """Size in bytes of one file.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    int
    """
    if not is_url(path):
        return Path(path).stat().st_size
    return int(_remote_query(path, storage_options, "size", "reading its size"))


def du(path, storage_options: dict | None = None) -> int:
    """Total size in bytes of the files under a folder or store.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    int
    """
    if not is_url(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return int(_remote_query(path, storage_options, "du", "listing it", total=True))


def stamp(path, storage_options: dict | None = None) -> list:
    """A cheap change detector for an input file, to skip re-hashing an unchanged input on a rerun.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    list
        ``[size, mtime_ns]`` locally, ``[size, ETag]`` (or the store's equivalent) on object stores.
    """
    if not is_url(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    info = _remote_query(path, storage_options, "info", "reading its metadata")
    tag = (
        info.get("ETag")
        or info.get("etag")
        or info.get("md5Hash")
        or info.get("LastModified")
        or info.get("mtime")
        or info.get("updated")
    )
    return [int(info.get("size") or 0), str(tag)]


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing


def makedirs(path, storage_options: dict | None = None) -> None:
    """Create a local folder (and its parents); object stores have no folders, so nothing to do there.

    Parameters
    ----------
    path : str or path-like
        The folder (a URL is accepted and ignored).
    storage_options : dict, optional
        Unused (object stores have no folders); accepted for symmetry with the other helpers.

    Raises
    ------
    HelmError
        Exit status 3, naming the path and the cause, when the folder cannot be made (a regular file in the way,
        a read-only file system, no permission, a full disk).
    """
    if is_url(path):
        return
    try:
        fault(f"mkdir:{name(path)}", path)
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, path) from None


#: ``errno`` values that say "the output location cannot take this write" rather than "the input is bad".
OUTPUT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
    errno.EFBIG,
}
#: The subset that can only come from writing (a full disk, a read-only file system): an error with one of these
#: raised anywhere while an output is written is that output's, whatever file the OS names (or none).
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def output_error(e: OSError, path) -> HelmError:
    """The one-line, exit-3 :class:`HelmError` for an OS error while making the output ``path``.

    Parameters
    ----------
    e : OSError
        The error (its ``errno`` picks the message and the hint).
    path : str or path-like
        The output being made.

    Returns
    -------
    HelmError

    Example
    -------
    >>> output_error(OSError(errno.ENOSPC, "No space left on device"), "out/x.zarr").exit_code
    3
    """
    code = e.errno
    cause = os.strerror(code) if code else str(e)
    where = os.fspath(path)
    culprit = e.filename if isinstance(e.filename, str) else None
    if code in (errno.ENOTDIR, errno.EEXIST):
        # mkdir met a regular file where a folder must go: name that file
        block = _file_in_the_way(where)
        return HelmError(
            f"cannot create the output folder: {block or culprit or where} is a file, not a folder",
            path=where,
            hint="choose another --out (or move that file away)",
            exit_code=3,
        )
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return HelmError(
            f"cannot write this output ({cause}); nothing half-written was kept",
            path=where,
            hint="free some space (or choose another --out), then rerun: finished outputs are reused",
            exit_code=3,
        )
    hint = (
        "choose an --out on a writable file system"
        if code == errno.EROFS
        else "choose a folder you can write to (--out) or fix its permissions"
    )
    return HelmError(f"the output folder is not writable ({cause})", path=where, hint=hint, exit_code=3)


def _file_in_the_way(path: str) -> str | None:
    """The first existing non-folder on the way from ``path`` up to the root, if any."""
    p = Path(os.path.abspath(path))
    for q in [p, *p.parents]:
        if q.exists() or q.is_symlink():
            return None if q.is_dir() else str(q)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Fault injection (for tests of the failure paths; never set in normal use)

#: Environment variable of :func:`fault`.
FAULT_ENV = "HELM_DASK_FAULT"
#: Set by the CLI to its own pid; inherited by the worker processes it starts, so that a fault reached in a
#: worker can stop the command itself.
MAIN_PID_ENV = "HELM_DASK_MAIN_PID"
_FIRED: set[str] = set()
_FIRED_LOCK = threading.Lock()


def fault(point: str, path=None) -> None:
    """Fault-injection hook: do what ``HELM_DASK_FAULT`` asks when the write ``point`` is reached.

    ``HELM_DASK_FAULT=ACTION@PATTERN[,ACTION@PATTERN...]``; ``PATTERN`` is a shell pattern matched against the
    point, ``ACTION`` one of

    * an ``errno`` name (``ENOSPC``, ``EROFS``, ``EACCES``, ``EDQUOT``, ...): the write raises that
      :class:`OSError` (every time: a full disk stays full);
    * ``kill``: SIGKILL the ``helm-dask`` command (``kill -9``; no cleanup can run);
    * ``interrupt``: SIGINT to the command's process group, as Ctrl-C in a terminal.

    ``kill`` and ``interrupt`` fire once per process. Points: ``write:NAME`` for every chunk or slab written into
    the output ``NAME`` (a volume of ``helm.zarr`` such as ``scan_raw`` or ``kmeans_k4``, a file such as
    ``label_map_k4.nii.gz`` or ``run.json``), ``mkdir:NAME`` when a folder is created. Chunks are written by
    the Dask workers, which read the variable too (it is inherited from the command's environment). Examples::

        HELM_DASK_FAULT=ENOSPC@write:* helm-dask run ...        # a full disk
        HELM_DASK_FAULT=kill@write:kmeans_k4 helm-dask run ...  # kill -9 in the middle of the kmeans stage

    Parameters
    ----------
    point : str
        The point reached, e.g. ``"write:scan_raw"``.
    path : str or path-like, optional
        The file named by a raised :class:`OSError`.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        action, _, pattern = item.strip().partition("@")
        if not pattern or not fnmatch.fnmatchcase(point, pattern.strip()):
            continue
        action = action.strip()
        if action in ("kill", "interrupt"):
            with _FIRED_LOCK:
                if item in _FIRED:
                    continue
                _FIRED.add(item)
            main = int(os.environ.get(MAIN_PID_ENV) or os.getpid())
            if action == "kill":
                os.kill(main, signal.SIGKILL)
            else:
                os.killpg(os.getpgid(main), signal.SIGINT)
                time.sleep(0.5)  # let the interrupt land while this write is still in flight
            continue
        code = getattr(errno, action.upper(), None)
        if not isinstance(code, int):
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} (an errno name, kill or interrupt)")
        raise OSError(code, os.strerror(code), None if path is None else os.fspath(path))


# ----------------------------------------------------------------------------------------------------------------
# Subject names: one safe path component

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_component(text, *, what: str = "--subject", path=None) -> str:
    """``text`` if it is a safe single path component, else a :class:`HelmError` saying so.

    Safe: letters, digits, ``.``, ``_``, ``-``; not starting with a dot or a dash; at most 128 characters.
    Subject names become folders under ``--out``: ``..``, separators or an absolute path would put outputs
    elsewhere, and a leading dot would hide the folder among temporaries.

    Parameters
    ----------
    text : str
        The candidate name.
    what : str
        What it is, for the message (the option's name).
    path : str, optional
        Named by the error.

    Returns
    -------
    str

    Example
    -------
    >>> check_component("sub01")
    'sub01'
    """
    s = str(text)
    if _SAFE_NAME.fullmatch(s) and s not in (".", ".."):
        return s
    raise HelmError(
        f"{what} {s!r} is not a safe folder name",
        path=path,
        hint="use letters, digits, '.', '_' and '-' only (no '/', no '..', not starting with '.' or '-'), e.g. sub01",
    )


def safe_component(text: str, default: str = "subject") -> str:
    """``text`` made a safe path component: every run of other characters becomes ``_``.

    Parameters
    ----------
    text : str
        Any text (a file name, a subject label).
    default : str
        Returned when nothing safe is left.

    Returns
    -------
    str

    Example
    -------
    >>> safe_component("sub 01 (T2*)"), safe_component("..")
    ('sub_01_T2', 'subject')
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")[:128].rstrip("._-")
    return s or default


# ----------------------------------------------------------------------------------------------------------------
# One writer per output folder


@contextlib.contextmanager
def exclusive(folder, *, what: str, log=None) -> Iterator[None]:
    """Hold an exclusive lock on ``<parent>/.<name>.lock`` while the block runs (local folders only).

    A second process that wants the same folder waits (and says so through ``log``) instead of writing the same
    outputs at the same time; the lock goes with the process (``flock``), so a killed holder never blocks
    anyone. The lock file is removed on release, and the parent folder too if this call created it and it is
    empty. URLs are not locked (object stores have no locks; concurrent runs there rewrite complete outputs).

    Parameters
    ----------
    folder : str or path-like
        The output folder to hold.
    what : str
        What is being written, for the waiting message.
    log : callable, optional
        ``log(message)``, told when this process has to wait for another one.

    Example
    -------
    >>> import tempfile
    >>> with exclusive(os.path.join(tempfile.mkdtemp(), "sub01"), what="sub01"):
    ...     pass
    """
    if is_url(folder):
        yield
        return
    folder = Path(folder)
    created = [q for q in [folder.parent, *folder.parent.parents] if not q.exists()]
    makedirs(folder.parent)
    lock = folder.parent / f".{folder.name}.lock"
    try:
        fd = _lock_file(lock, what, log)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as e:
        raise output_error(e, lock) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for q in created:  # deepest first: only folders this call made, and only if left empty
            with contextlib.suppress(OSError):
                q.rmdir()


def _lock_file(lock: Path, what: str, log) -> int:
    """An open descriptor of ``lock`` holding its ``flock``, waiting (and saying so) while another holds it."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                log(f"another helm-dask process (pid {holder}) is writing {what}: waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        # the holder before us removes the file on release: a lock on that old file locks nothing
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def open_read(path, storage_options: dict | None = None, *, block_size: int | None = None) -> IO[bytes]:
    """Open a file for reading (binary).

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.
    block_size : int, optional
        Read-ahead of remote files (bytes).

    Returns
    -------
    file object
        Raises :class:`FileNotFoundError` when the file is missing.
    """
    if not is_url(path):
        return open(path, "rb")
    fs, p = filesystem(path, storage_options)
    kw = {} if block_size is None else {"block_size": int(block_size)}
    try:
        return fs.open(p, "rb", **kw)
    except IsADirectoryError:
        raise
    except _REMOTE_ERRORS as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _remote_error(e, path, "opening it") from None


def read_text(path, storage_options: dict | None = None) -> str:
    """The whole (small) text file.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.

    Returns
    -------
    str
        Raises :class:`OSError` (``FileNotFoundError``) when the file is missing.
    """
    if not is_url(path):
        return Path(path).read_text()
    with open_read(path, storage_options) as f:
        return f.read().decode()


@contextlib.contextmanager
def open_write(path, *, overwrite: bool = False, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing (binary); it appears, complete, only if the ``with`` block succeeds.

    Local: written under a temporary sibling name and renamed into place (:func:`atomic_path`). URL: written
    with ``autocommit=False`` (for S3 a multipart upload) and committed when the block succeeds; on any
    exception, KeyboardInterrupt included, the upload is discarded and an existing object is untouched.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    overwrite : bool
        Replace an existing ``path`` (refused otherwise: :class:`HelmError`, exit 3).
    storage_options : dict, optional
        fsspec options for a URL.

    Example
    -------
    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with open_write(out) as f:
    ...     _ = f.write(b"done")
    >>> read_text(out)
    'done'
    """
    if not is_url(path):
        with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
            yield f
        return
    if not overwrite and exists(path, storage_options):
        raise HelmError(
            "already exists", path=path, hint="pass --overwrite to replace it, or choose another name", exit_code=3
        )
    fs, p = filesystem(path, storage_options)
    try:
        f = fs.open(p, "wb", autocommit=False)
    except _REMOTE_ERRORS as e:
        raise _remote_error(e, path, "opening it for writing") from None
    try:
        yield f
        f.close()  # uploads the last part; with autocommit=False nothing is visible yet
        f.commit()  # completes the upload: the object appears whole
    except BaseException:
        _discard(f)
        raise
    finally:
        _fresh(fs, p)


def _discard(f) -> None:
    """Abort an uncommitted upload without making anything visible (best effort: we are already failing)."""
    with contextlib.suppress(Exception):
        f.discard()
    with contextlib.suppress(Exception):
        f.closed = True  # skip the final flush/upload that close() would do


def write_text_atomic(path, text: str, storage_options: dict | None = None) -> None:
    """Replace a small text file (JSON, lut.txt) atomically: readers see the old or the new one, never half.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    text : str
        The new content.
    storage_options : dict, optional
        fsspec options for a URL.

    Example
    -------
    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "run.json")
    >>> write_text_atomic(out, "{}"); write_text_atomic(out, '{"k": 4}'); read_text(out)
    '{"k": 4}'
    """
    if not is_url(path):
        with atomic_path(path, overwrite=True) as tmp:
            fault(f"write:{name(path)}", tmp)
            Path(tmp).write_text(text)
        return
    with open_write(path, overwrite=True, storage_options=storage_options) as f:
        f.write(text.encode())


def copy_file(src, dst, storage_options: dict | None = None) -> None:
    """Copy one file (server-side on object stores); the destination is replaced atomically locally.

    Parameters
    ----------
    src, dst : str or path-like
        Local paths or URLs (either may be local).
    storage_options : dict, optional
        fsspec options for the URLs.
    """
    if not is_url(src) and not is_url(dst):
        with atomic_path(dst, overwrite=True) as tmp:
            shutil.copy2(src, tmp)
        return
    if is_url(src) and is_url(dst):
        fs, ps = filesystem(src, storage_options)
        fs2, pd = filesystem(dst, storage_options)
        if type(fs) is type(fs2):
            try:
                fs.copy(ps, pd)  # one atomic server-side copy (CopyObject) on S3
            except _REMOTE_ERRORS as e:
                raise _remote_error(e, dst, "copying to it") from None
            _fresh(fs, pd)
            return
    with open_read(src, storage_options) as fi, open_write(dst, overwrite=True, storage_options=storage_options) as fo:
        shutil.copyfileobj(fi, fo, 1 << 22)


def remove(path, storage_options: dict | None = None) -> None:
    """Delete a file, folder or store (recursively); missing is fine.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.
    """
    if not is_url(path):
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
        return
    fs, p = filesystem(path, storage_options)
    _fresh(fs, p)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(p):
            fs.rm(p, recursive=True)
    _fresh(fs, p)


def remove_stale_siblings(path, prefix: str, storage_options: dict | None = None) -> None:
    """Delete the hidden ``.<name><prefix>-*`` siblings of ``path`` (see :func:`sibling`) that a killed writer of
    this output left behind (SIGKILL, lost node).

    Those of a writer still running -- another process on this host, or another host's within
    :data:`FOREIGN_WRITER_GRACE_S` -- are left alone: two runs writing the same output at once then both finish
    (the last rename wins) instead of one losing its temporary.

    Parameters
    ----------
    path : str or path-like
        The output (a local path or a URL).
    prefix : str
        The siblings' prefix, e.g. ``".tmp"``.
    storage_options : dict, optional
        fsspec options for a URL.
    """
    pattern = f".{glob_escape(name(path))}{prefix}-*"
    if not is_url(path):
        for stale in Path(parent(path)).glob(pattern):
            try:
                mtime = stale.stat().st_mtime
            except OSError:
                continue
            if not _writer_alive(stale.name, mtime):
                remove(stale)
        return
    fs, p = filesystem(join(parent(path), pattern), storage_options)
    _fresh(fs, p.rsplit("/", 1)[0])
    with contextlib.suppress(*_REMOTE_ERRORS):
        for stale in fs.glob(p):
            # no cheap modification time of a prefix on object stores: another host's temporaries count as
            # old (as before); this host's running writers are still recognised
            if not _writer_alive(stale.rsplit("/", 1)[-1], 0.0):
                remove_quietly(f"{path.split('://', 1)[0]}://{stale}", storage_options)


def remove_quietly(path, storage_options: dict | None = None) -> None:
    """:func:`remove`, best effort (cleanup after a failure must not mask the failure).

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.
    """
    with contextlib.suppress(Exception):
        remove(path, storage_options)


# ----------------------------------------------------------------------------------------------------------------
# Zarr


def zarr_store(path, storage_options: dict | None = None, *, read_only: bool = False) -> Any:
    """What to hand to ``zarr.open_group``/``open_array``/``create_array`` for ``path``.

    A local path is returned unchanged (Zarr opens its own ``LocalStore``). A URL becomes a
    ``zarr.storage.FsspecStore`` built with the options in force; it pickles with them, which is how the
    options reach the Dask workers that read and write the chunks.

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.
    storage_options : dict, optional
        fsspec options for a URL.
    read_only : bool
        Open a URL's store read-only.

    Returns
    -------
    str or zarr.storage.FsspecStore

    Example
    -------
    >>> zarr_store("out/scan.zarr")
    'out/scan.zarr'
    """
    if not is_url(path):
        return os.fspath(path)
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(os.fspath(path), storage_options=options_for(storage_options), read_only=read_only)
    except (ValueError, ImportError) as e:
        raise HelmError(
            f"cannot open this URL as a Zarr store ({e})",
            path=path,
            hint="use a local path or an fsspec URL such as s3://bucket/key.zarr (needs s3fs)",
        ) from None
    except TypeError as e:
        raise HelmError(
            f"the storage options do not fit this file system ({e})",
            path=path,
            hint="check --storage-options (see the s3fs / fsspec documentation)",
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Atomic outputs


@contextlib.contextmanager
def atomic_path(path, *, overwrite: bool = False, storage_options: dict | None = None) -> Iterator[str]:
    """Yield a temporary sibling path to write to; rename it onto ``path`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the writes still in flight are stopped first
    (:func:`stop_pending_writes`: Dask tasks and Zarr's own I/O, which would otherwise recreate the temporary
    after its removal), then the temporary output is removed and ``path`` is untouched. A full disk or a
    read-only file system while writing becomes a one-line :class:`HelmError` (exit 3) naming ``path``.
    With ``overwrite`` the old output is replaced only after the new one is complete.

    For a URL (object store: no rename) the existence check is the same but ``path`` itself is yielded: the
    writer must make the output appear whole (:func:`open_write` for files,
    :func:`helm_dask.io.store.atomic_store` and the ``complete`` flag for Zarr volumes).

    Parameters
    ----------
    path : str or path-like
        The output (a file or a folder such as a Zarr store).
    overwrite : bool
        Replace an existing ``path`` (refused otherwise: :class:`HelmError`, exit 3).
    storage_options : dict, optional
        fsspec options for a URL.

    Example
    -------
    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(out) as tmp:
    ...     _ = Path(tmp).write_text("x")
    ...     exists(out)
    False
    >>> exists(out)
    True
    """
    if is_url(path):  # object store: no rename; completeness is marked in the metadata instead
        if not overwrite and exists(path, storage_options):
            raise HelmError(
                "already exists", path=path, hint="pass --overwrite to replace it, or choose another name", exit_code=3
            )
        yield os.fspath(path)
        return
    local = Path(os.fspath(path)).absolute()
    if local.exists() and not overwrite:
        raise HelmError(
            "already exists", path=local, hint="pass --overwrite to replace it, or choose another name", exit_code=3
        )
    tmp = _local_temporary(local)
    _LIVE.add(str(tmp))
    try:
        yield str(tmp)
        _replace(tmp, local)
    except BaseException as e:
        # stays in _LIVE: after an interrupt the CLI sweeps once more when the workers are gone
        stop_pending_writes()
        _remove_temporary(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ONLY_ERRNOS:
            # several outputs written by one computation: name the one whose write failed
            raise output_error(e, final_path_of(e.filename) or local) from None
        raise
    _LIVE.discard(str(tmp))


def _local_temporary(local: Path) -> Path:
    """The temporary sibling of the local output ``local``, once its folder is known to be writable."""
    folder = local.parent
    makedirs(folder)
    try:
        # Probe by writing: permission bits do not tell the whole story (root, read-only mounts, ACLs).
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise output_error(e, folder) from None
    # leftovers of an earlier writer of this output that was killed (SIGKILL, lost node); a writer that is still
    # running keeps its temporaries (the names record the writing process)
    for prefix in (".tmp", ".old"):
        remove_stale_siblings(local, prefix)
    return folder / f".{local.name}.tmp-{writer_token()}"


def _replace(tmp: Path, local: Path) -> None:
    """Move the finished ``tmp`` onto ``local``.

    A file is replaced in one atomic rename; a folder (a store) cannot be renamed onto an existing one, so the
    old one is moved aside first -- in a loop, because another process finishing the same output at the same
    moment may put its copy in place in between (the last complete copy wins; both are complete).
    """
    if not tmp.is_dir():
        os.replace(tmp, local)
        return
    for _ in range(100):
        try:
            os.replace(tmp, local)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        trash = local.parent / f".{local.name}.old-{writer_token()}"
        try:
            os.replace(local, trash)
        except FileNotFoundError:
            continue
        remove(trash)
    raise OSError(errno.EBUSY, "other writers keep replacing this output", str(local))


def _remove_temporary(tmp: Path) -> None:
    """Remove a temporary output and what was written beside it under its name (e.g. a scratch store)."""
    remove(tmp)
    for extra in tmp.parent.glob(glob.escape(tmp.name) + "*"):
        remove(extra)


#: Temporaries this process is writing now (see :func:`remove_live_temporaries`).
_LIVE: set[str] = set()


def remove_live_temporaries() -> None:
    """After an interrupt: stop the writes in flight and remove every temporary this process was writing.

    :func:`atomic_path` already does it for its own output; the CLI calls this once more after the cluster is
    shut down, so that a straggling write of a worker cannot leave a ``.<name>.tmp-*`` behind.
    """
    stop_pending_writes()
    for t in list(_LIVE):
        _remove_temporary(Path(t))


def stop_pending_writes(timeout_s: float = 30.0) -> None:
    """Wait (at most ``timeout_s``) until no chunk write started by this process is still running.

    A computation that fails or is interrupted leaves its running tasks running: in Dask's thread pool, on the
    workers of a ``distributed`` cluster (the client has released the futures, so nothing new starts, but
    running tasks finish), and in Zarr's I/O event loop (a write whose caller was interrupted). Each of them
    can still write a chunk -- and recreate the temporary folder a cleanup has just removed.

    Parameters
    ----------
    timeout_s : float
        The longest wait, in seconds. A call from a thread other than the main one returns at once (inside a
        task, the caller that owns the computation waits).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # inside a task (or a helper thread): the caller that owns the computation waits
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Exception):
        from distributed import get_client

        client = get_client()
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(Exception):
        import dask.threaded as dt

        pools = [dt.default_pool] + [p for d in list(dt.pools.values()) for p in d.values()]
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        dt.default_pool = None  # dask makes a new one for the next computation
        dt.pools.clear()
    with contextlib.suppress(Exception):
        _drain_zarr_io(max(0.1, deadline - time.monotonic()))


def _drain_zarr_io(timeout_s: float) -> None:
    import asyncio

    from zarr.core import sync as zsync

    loop = zsync.loop[0] if getattr(zsync, "loop", None) else None
    if loop is None or not loop.is_running():
        return

    async def drain():
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s + 1.0)


_TEMP_NAME = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}p\d+h[0-9a-f]{8}$")


def output_name(path) -> str:
    """The name an output will have once complete.

    Parameters
    ----------
    path : str or path-like
        A path, possibly inside a temporary of :func:`atomic_path`.

    Returns
    -------
    str

    Example
    -------
    >>> output_name("out/.scan_raw.tmp-0123abcdp42h89abcdef"), output_name("out/scan_raw")
    ('scan_raw', 'scan_raw')
    """
    for part in reversed(Path(str(path).split("://", 1)[-1]).parts):
        m = _TEMP_NAME.match(part)
        if m:
            return m.group(1)
    return Path(str(path)).name


def final_path_of(path) -> str | None:
    """The final path of the output a path inside a temporary belongs to, or None when it is not inside one.

    Parameters
    ----------
    path : str
        A path, e.g. one named by an :class:`OSError`.

    Returns
    -------
    str or None

    Example
    -------
    >>> final_path_of("out/.kmeans_k4.tmp-0123abcdp42h89abcdef/0/c/0"), final_path_of("out/x")
    ('out/kmeans_k4', None)
    """
    if not isinstance(path, str):
        return None
    parts = Path(path.split("://", 1)[-1]).parts
    last = max((i for i, part in enumerate(parts) if _TEMP_NAME.match(part)), default=None)
    if last is None:
        return None
    # outputs inside outputs (a phantom store's volumes): every temporary name on the way becomes its final one
    return str(Path(*[m.group(1) if (m := _TEMP_NAME.match(part)) else part for part in parts[: last + 1]]))
