"""benchmarks/robustness.py: the rewriting of a chapter's hidden asserts into records, and the
table over seeds (the notebooks themselves are run by the script, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("robustness", ROOT / "benchmarks" / "robustness.py")
robustness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(robustness)


def _notebook(first="SEED = 0   # the seed\nx = SEED * 10"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(first),
                nbformat.v4.new_code_cell("assert x >= 0 and 0 < x + 1 < 100\nassert x in (0, 30)"),
                nbformat.v4.new_code_cell("assert SEED > -1, 'visible: not rewritten'")]
    nb.cells[1].metadata["tags"] = ["remove-input"]
    return nb


def _execute(nb) -> dict:
    """Run the instrumented cells in one namespace, as a kernel would."""
    namespace: dict = {}
    for cell in nb.cells[:-1]:
        exec(cell.source, namespace)       # noqa: S102 - the test's own cells
    return namespace["_claims"]


def test_hidden_asserts_become_records_and_the_seed_is_set(tmp_path):
    nb = robustness.instrument(_notebook(), seed=3, out=tmp_path / "claims.json")
    assert "SEED = 3   # the seed" in nb.cells[1].source
    assert nb.cells[3].source == "assert SEED > -1, 'visible: not rewritten'"
    claims = _execute(nb)                   # x = 30: every record, no AssertionError
    by_source = {c["source"]: c for c in claims.values()}
    assert by_source["x >= 0"] == {"source": "x >= 0", "op": ">=", "values": [[30.0, 0.0]]}
    assert by_source["0 < x + 1"]["values"] == [[0.0, 31.0]]      # a chain, split in two
    assert by_source["x + 1 < 100"]["values"] == [[31.0, 100.0]]
    assert by_source["x in (0, 30)"]["values"] == [True]


def test_a_failing_check_is_recorded_not_raised(tmp_path):
    nb = robustness.instrument(_notebook(), seed=7, out=tmp_path / "claims.json")
    claims = _execute(nb)                   # x = 70: "x in (0, 30)" fails
    assert {c["source"]: c["values"] for c in claims.values()}["x in (0, 30)"] == [False]
    nb = robustness.instrument(_notebook("SEED = 0\n"), seed=1, out=tmp_path / "claims.json")
    claims = _execute(nb)                   # x undefined: the error is the record
    assert all(v[0].startswith("NameError") for v in (c["values"] for c in claims.values()))


def test_the_table_gives_the_spread_beside_the_bound():
    runs = [{"chapter": "10_rlhf.ipynb", "seed": s, "claims": {
        "a": {"source": "kl > 20", "op": ">", "values": [[kl, 20.0]]},
        "b": {"source": "0.5 < acc", "op": "<", "values": [[0.5, acc]]},
        "c": {"source": "free > 2 * after", "op": ">", "values": [[kl, 2 * 4.0 + s]]},
        "d": {"source": "ok", "op": None, "values": [s != 1]}}}
        for s, kl, acc in [(0, 30.0, 0.6), (1, 10.0, 0.7), (2, 50.0, 0.65)]]
    text = robustness.table(robustness.summarise(runs))
    assert "| 10 | `kl > 20` | > 20 | 10 / 30 / 50 | 2/3 |" in text
    assert "| 10 | `0.5 < acc` | > 0.5 | 0.6 / 0.65 / 0.7 | 3/3 |" in text
    assert "| 10 | `free > 2 * after` | margin > 0 | 1 / 22 / 40 | 3/3 |" in text
    assert "| 10 | `ok` |  |  | 2/3 |" in text
    json.dumps(robustness.summarise(runs))  # the records stay plain JSON


def test_a_chapter_without_a_seed_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SEED = <int>"):
        robustness.instrument(_notebook("x = 0"), seed=1, out=tmp_path / "c.json")
    seeded = robustness.instrument(_notebook("SEED = 1337  # the recipe's"), seed=4,
                                   out=tmp_path / "d.json")
    assert "SEED = 4  # the recipe's" in seeded.cells[1].source
    with pytest.raises(ValueError, match="no notebook for chapter"):
        robustness.chapter_path("99")
