"""A learner's session in Jupyter, replayed: run a chapter's exercises with a wrong answer in
the stub, as "Run all" would, then rerun the checker. It must grade the learner's function,
not the solution that ran below it."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "book" / "03_self_attention.ipynb"

WRONG_SOFTMAX = '''def softmax(x):
    e = x.exp()                      # no shift: exp(1000) overflows
    return e / e.sum(dim=-1, keepdim=True)
'''

LEARNER_RERUNS_THE_CHECKER = '''from lessons_lib.exercises import CheckFailed
try:
    check_softmax(softmax)
    print("PASSED")
except CheckFailed as err:
    print("FAILED:", err)
check_softmax(softmax_solution)
'''


def exercise_session(wrong_stub):
    """The whole chapter, "Run all", with the softmax stub replaced by ``wrong_stub`` and the
    learner's rerun of the checker at the end."""
    import nbformat
    nb = nbformat.reads(CHAPTER.read_text(), as_version=4)
    cells = list(nb.cells)
    stubs = [c for c in cells if c.cell_type == "code" and c.source.startswith("def softmax(")]
    assert len(stubs) == 1, "expected one softmax stub in chapter 3's exercises"
    stubs[0].source = wrong_stub
    cells.append(nbformat.v4.new_code_cell(LEARNER_RERUNS_THE_CHECKER))
    nb.cells = cells
    return nb


@pytest.mark.slow
def test_run_all_then_the_checker_grades_the_learners_function():
    from nbclient import NotebookClient
    nb = exercise_session(WRONG_SOFTMAX)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(CHAPTER.parent)}}).execute()
    solutions = [c for c in nb.cells[:-1] if c.cell_type == "code" and "_solution" in c.source
                 and "remove-input" not in c.metadata.get("tags", [])]
    assert len(solutions) == 4
    for cell in solutions:           # every solution ran and passed its checker
        text = "".join(o.get("text", "") for o in cell.outputs)
        assert "checks passed" in text, text
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "FAILED:" in last and "PASSED" not in last, last
    assert "inf" in last or "nan" in last, last   # the message names what came back
    assert last.rstrip().endswith("checks passed"), last   # the solution still passes
    print(json.dumps(last))
