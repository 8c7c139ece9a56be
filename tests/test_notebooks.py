"""The chapter notebooks as files: stored without outputs, listed in the table of contents,
each checking its claims in hidden assert cells and ending with gated, hidden solutions."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_chapters():
    assert NOTEBOOKS, "no chapter notebooks found in book/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has stored outputs: clear them"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_listed_in_the_table_of_contents(path):
    toc = (ROOT / "_toc.yml").read_text()
    assert f"file: book/{path.stem}" in toc


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_claims_are_checked_in_hidden_cells(path):
    hidden_asserts = [c for c in cells(path) if c["cell_type"] == "code"
                      and "remove-input" in c.get("metadata", {}).get("tags", [])
                      and re.search(r"^\s*assert ", source(c), re.M)]
    assert len(hidden_asserts) >= 3, f"{path.name}: expected hidden (remove-input) assert cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_have_gated_dropdown_solutions_that_call_a_checker(path):
    cs = cells(path)
    texts = [source(c) for c in cs]
    exercises = [t for t in texts if "```{exercise}" in t]
    starts = [i for i, t in enumerate(texts) if "```{solution-start}" in t]
    assert 3 <= len(exercises) <= 5, f"{path.name}: {len(exercises)} exercises, expected 3 to 5"
    assert len(starts) == len(exercises)
    for i in starts:
        assert ":class: dropdown" in texts[i], f"{path.name}: solution at cell {i} is not a dropdown"
        body = [j for j in range(i + 1, len(cs)) if "```{solution-end}" in texts[j]]
        assert body, f"{path.name}: solution-start at cell {i} has no solution-end"
        solution_code = "".join(texts[j] for j in range(i + 1, body[0]) if cs[j]["cell_type"] == "code")
        assert "check_" in solution_code, f"{path.name}: the solution at cell {i} does not call a checker"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_a_title_and_ends_with_further_reading(path):
    texts = [source(c) for c in cells(path) if c["cell_type"] == "markdown"]
    assert texts[0].lstrip().startswith("# "), f"{path.name} must open with a title"
    assert any("Further reading" in t for t in texts), f"{path.name} has no further reading"
    assert any("What we measured" in t for t in texts), f"{path.name} has no 'What we measured' section"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_visible_code_fits_the_page(path):
    """The site's code column shows about 80 characters before it scrolls sideways."""
    wide = [(i, line) for i, c in enumerate(cells(path)) if c["cell_type"] == "code"
            and "remove-input" not in c.get("metadata", {}).get("tags", [])
            for line in source(c).split("\n") if len(line) > 80]
    assert not wide, f"{path.name}: {len(wide)} visible code lines over 80 characters, e.g. {wide[:3]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_headings_are_not_numbered_by_hand(path):
    """The book numbers sections itself; '## 3.1 Queries' would render as '3.1. 3.1 Queries'."""
    numbered = [line for c in cells(path) if c["cell_type"] == "markdown"
                for line in source(c).split("\n") if re.match(r"#{1,6}\s+\d+(\.\d+)*[.)]?\s", line)]
    assert not numbered, f"{path.name}: headings numbered by hand: {numbered}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_later_chapters_are_named(path):
    """'A later chapter' leaves the learner guessing: name it (see the map in intro.md)."""
    vague = [m.group(0) for c in cells(path) if c["cell_type"] == "markdown"
             for m in re.finditer(r"\b(a|the) (later|future|coming) chapters?\b", source(c), re.I)]
    assert not vague, f"{path.name}: {vague}"


# ---------------------------------------------------------------------------------------------
# The notebooks in the learner's Jupyter: exercises that grade the learner's own function,
# hidden cells that are collapsed and readable, and no word about how the book was made.

def solution_spans(cs):
    """(stub cell, [solution code cells]) for every exercise of a notebook."""
    texts = [source(c) for c in cs]
    spans = []
    for i, text in enumerate(texts):
        if "```{solution-start}" not in text:
            continue
        stub = max(j for j in range(i) if cs[j]["cell_type"] == "code")
        end = next(k for k in range(i + 1, len(cs)) if "```{solution-end}" in texts[k])
        spans.append((stub, [k for k in range(i + 1, end) if cs[k]["cell_type"] == "code"]))
    return spans


def top_level_names(code):
    """Names a cell binds at the top level: functions, classes and assignment targets."""
    import ast
    names = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def is_hidden(cell):
    return "remove-input" in cell.get("metadata", {}).get("tags", [])


def is_collapsed(cell):
    return cell.get("metadata", {}).get("jupyter", {}).get("source_hidden") is True


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_never_overwrite_the_learners_stub(path):
    """'Run all' must leave the learner's function in place: a solution defines its own name
    (``softmax_solution`` for the stub ``softmax``), and is collapsed in Jupyter."""
    cs = cells(path)
    spans = solution_spans(cs)
    stubs = set().union(*(top_level_names(source(cs[stub])) for stub, _ in spans))
    for stub, solution in spans:
        assert top_level_names(source(cs[stub])), f"{path.name} cell {stub}: no stub defined"
        for k in solution:
            clash = top_level_names(source(cs[k])) & stubs
            assert not clash, f"{path.name} cell {k}: the solution redefines the stub {clash}"
            assert is_collapsed(cs[k]), f"{path.name} cell {k}: solution not collapsed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_hidden_cells_are_collapsed_and_say_what_they_check(path):
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] != "code" or not is_hidden(cell):
            continue
        text = source(cell)
        assert is_collapsed(cell), f"{path.name} cell {i}: hidden cell not collapsed in Jupyter"
        assert text.lstrip().startswith("# "), (
            f"{path.name} cell {i}: a hidden cell opens with a comment saying what it checks, "
            f"got {text.splitlines()[0][:60]!r}")
        wide = [line for line in text.split("\n") if len(line) > 88]
        assert not wide, f"{path.name} cell {i}: {len(wide)} lines over 88 characters: {wide[:2]}"


PROCESS_WORDS = re.compile(
    r"\bour runs?\b|\bour (CI|development|machine)\b|\bCI machine|during development"
    r"|development runs?|while (writing|this chapter was written)|\bwe tried\b"
    r"|FINDINGS|DATA\.md|\bthe issue\b|\bissue asks\b|\(issue\b", re.I)


def process_words(text):
    return [m.group(0) for m in PROCESS_WORDS.finditer(text)]


def test_process_words_are_found():
    assert process_words("as in our runs (FINDINGS: 0.7); measured while writing")
    assert not process_words("the tissue of the model; our model runs on your CPU")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_speak_to_the_learner_not_of_how_the_book_was_made(path):
    found = [(i, w) for i, c in enumerate(cells(path)) for w in process_words(source(c))]
    assert not found, f"{path.name}: words about how the book was made: {found}"


def test_the_library_speaks_to_the_learner_too():
    found = [(p.name, w) for p in sorted((ROOT / "lessons_lib").rglob("*.py"))
             for w in process_words(p.read_text())]
    assert not found, f"lessons_lib: words about how the book was made: {found}"
