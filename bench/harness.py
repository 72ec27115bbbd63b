"""Benchmark plumbing: sample the resident memory and I/O of *all* processes of a run, append result rows.

The sampler polls this process and all its descendants (the LocalCluster's nanny, worker and scheduler
processes included) every 0.1 s and records the peak of the summed RSS, so the number is what the machine
actually had to hold, not just the client's share.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

#: The checkout this bench belongs to. Its own package is imported, ahead of the environment's: an editable
#: install points at one checkout, so a second worktree's bench (an A/B run) would otherwise measure the first
#: checkout's code under its own commit. Spawned workers inherit this path.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1 if sys.path and sys.path[0] == str(Path(__file__).parent) else 0, str(ROOT))

# HELM_BENCH_RESULTS sends rows elsewhere (trial runs, or a frozen checkout benchmarking for the main tree)
RESULTS = Path(os.environ.get("HELM_BENCH_RESULTS") or Path(__file__).parent / "results" / "results.csv")
FIELDS = [
    "date",
    "commit",
    "stage",
    "spacing_mm",
    "work_spacing_mm",
    "voxels",
    "workers",
    "threads_per_worker",
    "wall_s",
    "mvox_per_s",
    "mb_per_s",
    "peak_rss_mb",
    "read_mb",
    "written_mb",
    "data_mb",
    "load_avg",
    "note",
    "machine",
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores {cpu}, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def commit(root: Path | None = None) -> str:
    """HEAD's short hash, with ``+dirty`` when the package or the bench scripts differ from it: a row measured on
    uncommitted code must not carry the name of a commit that does not hold that code (the rows' own CSV and
    plots do not count)."""
    if root is None:
        pkg = sys.modules.get("helm_dask")
        # the checkout whose package runs (imported from ROOT unless something imported it first)
        root = Path(pkg.__file__).resolve().parent.parent if pkg is not None and pkg.__file__ else ROOT
    try:
        head = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True, stderr=subprocess.DEVNULL
        ).strip()
        paths = ["helm_dask", "bench", ":(exclude)bench/results", "pyproject.toml"]
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=root, capture_output=True)
    except Exception:
        return ""
    return head + ("+dirty" if diff.returncode == 1 else "")


class Sampler:
    """Peak summed RSS of this process tree, and bytes read/written by it (logical I/O: rchar/wchar)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.root = psutil.Process()
        self.peak_rss = 0
        self.peak_rss_overall = 0
        self._io_base: dict[int, tuple[int, int]] = {}
        self._io_last: dict[int, tuple[int, int]] = {}
        self._loads: list[float] = []
        self.peak_by_pid: dict[int, int] = {}  # since the last mark: who holds the memory (client vs workers)
        self.stage_breakdown = ""
        self._cpu_base: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._started = False
        self._load_sum, self._load_n = 0.0, 0
        self.stage_load = 0.0  # mean 1-min load average between the last two marks (other work on the machine)
        self._listed_at, self._listed = -1e9, [self.root]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    #: Seconds between two listings of the descendants. Listing them reads every process's /proc entry; at
    #: every 0.1 s sample it was 3.7% of a core in the client (py-spy, a 0.1 mm mirror stage), and a bench's
    #: processes (the cluster's) live for the whole run. A process is missed for at most this long.
    REFRESH_S = 2.0

    def _procs(self):
        now = time.monotonic()
        if now - self._listed_at >= self.REFRESH_S:
            self._listed_at = now
            procs = [self.root]
            try:
                procs += self.root.children(recursive=True)
            except psutil.Error:
                pass
            self._listed = procs
        return self._listed

    def _sample(self):
        total = 0
        for p in self._procs():
            try:
                with p.oneshot():
                    rss, ct, io = p.memory_info().rss, p.cpu_times(), p.io_counters()
                total += rss
                self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), rss)
                cpu = ct.user + ct.system
                # CPU seconds: from the first sample for processes already running, from 0 for new ones
                self._cpu_base.setdefault(p.pid, cpu if not self._started else 0.0)
                self._cpu_last[p.pid] = cpu
                cur = (io.read_chars, io.write_chars)
                # like CPU: from the first sample for processes already running (a cluster started before the
                # measured block), from 0 for processes started during it
                self._io_base.setdefault(p.pid, cur if not self._started else (0, 0))
                self._io_last[p.pid] = cur
            except (psutil.Error, AttributeError):
                continue
        self.peak_rss = max(self.peak_rss, total)
        self._loads.append(os.getloadavg()[0])
        self._load_sum, self._load_n = self._load_sum + self._loads[-1], self._load_n + 1
        self.peak_rss_overall = max(self.peak_rss_overall, total)
        self._started = True

    def mark(self) -> tuple[int, int, int]:
        """Peak RSS and I/O since the last mark (for per-stage numbers inside one run); resets the peak."""
        self._sample()
        peak, self.peak_rss = self.peak_rss, 0
        parts = sorted(self.peak_by_pid.items(), key=lambda kv: -kv[1])
        self.stage_breakdown = "peak MB by process: " + ", ".join(
            f"{'client' if pid == self.root.pid else pid}={rss / 2**20:.0f}" for pid, rss in parts if rss > 100 * 2**20
        )
        self.peak_by_pid = {}
        # CPU seconds since the last mark, the client apart from its children (scheduler threads run in the
        # client): how much of a stage is serial work in the client, the part a second worker cannot share
        marked = getattr(self, "_cpu_marked", {})
        since = {pid: cpu - self._cpu_base[pid] - marked.get(pid, 0.0) for pid, cpu in self._cpu_last.items()}
        self._cpu_marked = {pid: cpu - self._cpu_base[pid] for pid, cpu in self._cpu_last.items()}
        client = since.pop(self.root.pid, 0.0)
        self.stage_breakdown += f"; CPU s: client {client:.1f}, workers {sum(since.values()):.1f}"
        self.stage_load, self._loads = (sum(self._loads) / len(self._loads) if self._loads else 0.0), []
        rd, wr = self.read_bytes, self.written_bytes
        last = getattr(self, "_marked", (0, 0))
        self._marked = (rd, wr)
        return peak, rd - last[0], wr - last[1]

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mean_load(self) -> float:
        """Mean 1-min load average over the whole sampling (how busy the machine was)."""
        return self._load_sum / self._load_n if self._load_n else 0.0

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole process tree since the start (load-independent work)."""
        return sum(self._cpu_last[p] - self._cpu_base[p] for p in self._cpu_last)

    @property
    def read_bytes(self) -> int:
        return sum(self._io_last[p][0] - self._io_base[p][0] for p in self._io_last)

    @property
    def written_bytes(self) -> int:
        return sum(self._io_last[p][1] - self._io_base[p][1] for p in self._io_last)


@contextmanager
def measured():
    """``with measured() as m:`` ... then ``m.wall``, ``m.sampler.peak_rss`` etc."""

    class M:
        pass

    m = M()
    with Sampler() as s:
        t0 = time.perf_counter()
        yield m
        m.wall = time.perf_counter() - t0
    m.sampler = s


def disk_size(p: Path) -> int:
    """Bytes of a file, or of every file under a folder (a Zarr store); 0 when absent."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def append_row(row: dict, path: Path = RESULTS) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "load_avg": round(os.getloadavg()[0], 1),
    }
    full.update(row)
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header != FIELDS:  # an older layout: rewrite it once with the current columns
                old_rows = list(reader)
                with open(path, "w", newline="") as g:
                    w = csv.DictWriter(g, fieldnames=FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old_rows)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(full)
    return full


def _scheduler_counters(dask_scheduler) -> dict:
    """The workers' cumulative metrics and the bytes the scheduler has sent to the workers (task messages)."""
    out = dict(dask_scheduler.cumulative_worker_metrics)
    out["scheduler-to-workers-bytes"] = sum(getattr(c, "byte_count", 0) for c in dask_scheduler.stream_comms.values())
    out["transitions"] = dask_scheduler.transition_counter  # ~4-5 per task run
    return out


class WorkerTime:
    """Where the workers' time went between two marks, from distributed's fine performance metrics.

    In some 0.1 mm pairs the workers' CPU grew 8-25% per stage when a second worker joined. This tells the
    tasks' own CPU apart from the workers' other work and from moving results between workers (``gather-dep``
    on the receiving side, ``get-data`` on the sending side), which only a second worker pays. ``execute``
    ``noncpu`` is a task's wall time off the CPU: waiting on I/O, or on a core the client or the other worker
    holds. Metrics reach the scheduler with the workers' heartbeats, so a mark can miss up to a second of the
    tail of a stage (it then counts in the next one).
    """

    def __init__(self, client):
        self.client = client
        self._last = self._snapshot()

    def _snapshot(self) -> dict:
        if self.client is None:
            return {}
        out = self.client.run_on_scheduler(_scheduler_counters)
        comm = getattr(self.client, "scheduler_comm", None)
        out["client-to-scheduler-bytes"] = getattr(comm, "byte_count", 0)
        return out

    def mark(self) -> str:
        """``"worker s: ..."``: seconds since the last mark by activity (empty without a distributed client)."""
        now = self._snapshot()
        d = {k: v - self._last.get(k, 0.0) for k, v in now.items()}
        self._last = now

        def total(context: str, activity: str | None = None, unit: str = "seconds") -> float:
            return sum(
                v
                for k, v in d.items()
                if isinstance(k, tuple) and k[0] == context and k[-1] == unit
                if activity is None or k[-2] == activity
            )

        if not d:
            return ""
        served = total("get-data", "memory-read", "bytes")
        return (
            f"worker s: execute cpu {total('execute', 'thread-cpu'):.1f}, "
            f"noncpu {total('execute', 'thread-noncpu'):.1f}; gather-dep {total('gather-dep'):.1f} "
            f"(network {total('gather-dep', 'network'):.1f}, deserialize {total('gather-dep', 'deserialize'):.1f}); "
            f"get-data {total('get-data'):.1f} (serialize {total('get-data', 'serialize'):.1f}, "
            f"{served / 2**20:.0f} MB served to workers and the client); messages: client to scheduler "
            f"{d.get('client-to-scheduler-bytes', 0) / 2**20:.0f} MB, scheduler to workers "
            f"{d.get('scheduler-to-workers-bytes', 0) / 2**20:.0f} MB; "
            f"{d.get('transitions', 0):.0f} scheduler transitions"
        )
