"""Repository-wide pytest settings.

1. Time every notebook nbval executes and print the times.
2. Hand the outputs of every notebook nbval ran cleanly to the website build: the build
   (`execute_notebooks: cache` in _config.yml) looks each notebook up in the jupyter-cache at
   `_build/.jupyter_cache` by a hash of its code cells and, on a hit, renders the cached outputs
   instead of executing the notebook again. So `pytest` then `jupyter-book build .` executes the
   book once. A notebook with any failed, errored, skipped or deselected cell is not cached: the
   build then executes it itself (and `-W` reports its error).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
# Where `jupyter-book build .` keeps its cache when _config.yml sets no `execute: cache:`.
JUPYTER_CACHE = ROOT / "_build" / ".jupyter_cache"

# Each chapter's time budget on a quiet 2-core CPU: 90 s, or what its issue allowed a training
# chapter (chapter 9's includes pre-training its base model when the cache is cold).
BUDGET_SECONDS = defaultdict(lambda: 90, {"09_finetuning.ipynb": 150, "10_rlhf.ipynb": 150,
                                            "11_dpo_grpo.ipynb": 150, "12_emergence.ipynb": 150,
                                            "13_limitations.ipynb": 150,
                                            "14_modern_llm.ipynb": 150,
                                            "15_beyond_transformers.ipynb": 150,
                                            "16_scaling_out.ipynb": 150,
                                            "17_your_assistant.ipynb": 150})
BOOK_BUDGET_SECONDS = 15 * 60

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
    tr = terminalreporter
    if _cached or _not_cached:
        tr.section("notebook outputs handed to the site build")
        if _cached:
            tr.write_line(f"cached {len(_cached)} notebook(s) that ran cleanly in {JUPYTER_CACHE}: "
                          f"`jupyter-book build .` renders them without executing them again")
        for line in _not_cached:
            tr.write_line(line)
    if not _notebook_seconds:
        return
    tr.section("notebook execution times (nbval, wall clock from first to last cell)")
    tr.write_line(_machine_line())
    total = 0.0
    for name in sorted(_notebook_seconds):
        wall = _notebook_last_end[name] - _notebook_first_start[name]
        total += wall
        budget = BUDGET_SECONDS[name]
        flag = f"   OVER the {budget} s budget" if wall > budget else ""
        tr.write_line(f"{name:40s} {wall:7.1f} s  (cells {_notebook_seconds[name]:.1f} s){flag}")
    flag = f"   OVER the {BOOK_BUDGET_SECONDS // 60}-minute budget" if total > BOOK_BUDGET_SECONDS else ""
    tr.write_line(f"{'all notebooks':40s} {total:7.1f} s{flag}")


def _machine_line() -> str:
    """The CPU and the precision the notebooks ran with: timings mean little without them."""
    try:
        from lessons_lib.runtime import runtime

        return f"measured on: {runtime().describe()}"
    except Exception as exc:  # noqa: BLE001 - a report line must never fail the run
        return f"measured on: unknown ({type(exc).__name__}: {exc})"


# --- nbval's outputs -> the site build's jupyter-cache -------------------------------------------

class _Run:
    """What nbval did with one notebook so far."""

    def __init__(self, nb):
        self.nb = nb                                  # the notebook as nbval read it
        self.n_code = sum(c.cell_type == "code" for c in nb.cells)
        self.outputs: dict[int, list] = {}            # cell_num -> outputs of a passed cell
        self.language_info: dict | None = None
        self.bad = False                              # a cell failed, errored or was skipped
        self.done = False


_runs: dict[str, _Run] = {}
_cached: list[str] = []
_not_cached: list[str] = []


def _is_nbval_cell(item) -> bool:
    return (hasattr(item, "test_outputs") and hasattr(item, "cell_num")
            and hasattr(getattr(item, "parent", None), "nb"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _is_nbval_cell(item):
        return
    key = str(Path(str(getattr(item, "path", None) or item.fspath)).resolve())
    run = _runs.get(key)
    if run is None or run.nb is not item.parent.nb:
        run = _runs[key] = _Run(item.parent.nb)
    if report.failed or report.skipped or hasattr(report, "wasxfail"):
        run.bad = True
    elif report.when == "call":
        run.outputs[item.cell_num] = item.test_outputs or []
        if run.language_info is None:
            run.language_info = _kernel_language_info(item.parent) or {}
    if (report.when == "teardown" and not run.done and not run.bad
            and len(run.outputs) == run.n_code):
        run.done = True
        _cache_notebook(key, run, _notebook_wall_seconds(Path(key).name))
    elif report.when == "teardown" and run.bad and not run.done:
        run.done = True
        _evict_notebook(run)
        _not_cached.append(f"not cached, a cell failed or was skipped (the site build will "
                           f"execute it): {Path(key).name}")


def _kernel_language_info(nb_file) -> dict | None:
    """The kernel's language_info, as nbclient stores it in an executed notebook's metadata
    (it gives the page's code cells their `ipython3` highlighting). Asked between two cells."""
    try:
        reply = nb_file.kernel.kc.kernel_info(reply=True, timeout=10)
        return dict(reply["content"]["language_info"])
    except Exception:  # noqa: BLE001 - a nicety: without it the lexer comes from the notebook
        return None


def _notebook_wall_seconds(name: str) -> float:
    if name in _notebook_first_start:
        return _notebook_last_end[name] - _notebook_first_start[name]
    return 0.0


def _evict_notebook(run: _Run) -> None:
    """Drop an older cache entry for these code cells: the build must execute them itself."""
    if not (JUPYTER_CACHE / "global.db").exists():
        return
    try:
        from jupyter_cache import get_cache

        cache = get_cache(str(JUPYTER_CACHE))
        cache.remove_cache(cache.match_cache_notebook(run.nb).pk)
    except Exception:  # noqa: BLE001 - no entry (KeyError) or no jupyter-cache: nothing to drop
        pass


def _cache_notebook(path: str, run: _Run, seconds: float) -> None:
    try:
        import nbformat
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn
    except ImportError:  # no jupyter-cache (or no nbformat): nothing to hand over
        return
    try:
        nb = copy.deepcopy(run.nb)
        if run.language_info:
            nb.metadata["language_info"] = nbformat.from_dict(run.language_info)
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        for count, cell in enumerate(code_cells, start=1):
            outputs = [nbformat.from_dict(copy.deepcopy(dict(o))) for o in run.outputs[count - 1]]
            for out in outputs:
                if out.output_type == "execute_result":
                    out.execution_count = count
            cell.outputs = outputs
            cell.execution_count = count
        nbformat.validate(nb)
        cache = get_cache(str(JUPYTER_CACHE))
        cache.cache_notebook_bundle(
            CacheBundleIn(nb, uri=path, data={"execution_seconds": seconds}),
            check_validity=False,
            overwrite=True,
        )
    except Exception as exc:  # noqa: BLE001 - never fail the tests over the cache
        _not_cached.append(f"not cached ({type(exc).__name__}: {exc}): {Path(path).name}")
    else:
        _cached.append(path)
