"""Suite-wide pytest hooks: keep the quick suite (``-m "not slow"``) quick.

The markers themselves (``slow``, ``e2e``, ``notebook``) are registered in ``pyproject.toml``. This file lists,
at the end of a run, the tests that are not marked ``slow`` but took longer than the ``slow`` marker's threshold
(15 s on the 2-core reference machine; ``HELM_SLOW_TEST_S`` overrides it, e.g. on a loaded machine where every
test takes two or three times longer), so that a test which has grown slow gets its marker before it makes the
quick suite miss its two-minute budget. A warning only: timings depend on the machine.
"""

from __future__ import annotations

import os

import pytest

#: Seconds (setup + call + teardown) above which a test belongs to the slow suite; the ``slow`` marker's
#: definition in pyproject.toml says the same.
SLOW_TEST_S = float(os.environ.get("HELM_SLOW_TEST_S", "15"))

_too_slow: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # runs in the controller under xdist too (the workers' reports carry duration and keywords)
    if "slow" in report.keywords:
        return
    _too_slow[report.nodeid] = _too_slow.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    slow = sorted(((s, n) for n, s in _too_slow.items() if s > SLOW_TEST_S), reverse=True)
    if not slow:
        return
    terminalreporter.section("tests over the slow threshold without @pytest.mark.slow")
    terminalreporter.write_line(
        f"{len(slow)} test(s) took more than {SLOW_TEST_S:g} s (HELM_SLOW_TEST_S); mark them slow or make them faster:"
    )
    for s, nodeid in slow:
        terminalreporter.write_line(f"  {s:7.1f} s  {nodeid}")
