"""Repository-wide pytest settings: time every notebook nbval executes and print the times."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

_notebook_seconds: dict[str, float] = defaultdict(float)
_notebook_first_start: dict[str, float] = {}
_notebook_last_end: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = str(report.fspath) if hasattr(report, "fspath") else report.nodeid.split("::")[0]
    if not path.endswith(".ipynb"):
        return
    name = Path(path).name
    _notebook_seconds[name] += report.duration
    now = time.perf_counter()
    _notebook_first_start.setdefault(name, now - report.duration)
    _notebook_last_end[name] = now


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    tr = terminalreporter
    tr.section("notebook execution times (nbval, wall clock from first to last cell)")
    total = 0.0
    for name in sorted(_notebook_seconds):
        wall = _notebook_last_end[name] - _notebook_first_start[name]
        total += wall
        flag = "   OVER the 90 s budget" if wall > 90 else ""
        tr.write_line(f"{name:40s} {wall:7.1f} s  (cells {_notebook_seconds[name]:.1f} s){flag}")
    tr.write_line(f"{'all notebooks':40s} {total:7.1f} s")
