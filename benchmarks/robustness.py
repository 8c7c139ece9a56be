"""Do the chapters' checks hold on every seed? Run chapters on several seeds and see.

A chapter whose first code cell sets ``SEED = <int>`` feeds that seed to everything it trains.
This script executes such a chapter once per seed (with nbclient, as Jupyter would), after
rewriting every ``assert`` of its hidden check cells (tag ``remove-input``) into a call that
*records* both sides of each comparison instead of stopping the notebook. Then it prints, for
every check, the bound and the min / median / max of the checked quantity over the seeds, and
how many seeds it held on:

    python benchmarks/robustness.py --chapters 10 11 15 --seeds 0 1 2 3 4
    LESSONS_LIB_PRECISION=fp32 python benchmarks/robustness.py --chapters 11 --out fp32.json

A check with a fixed bound (``free.kl > 20``) shows the quantity's range beside the bound; a
check between two measured quantities (``free.kl > 2 * after.kl``) shows the margin, the left
side less the right (for ``>``) or the right less the left (for ``<``): positive means it held.
A check that is not a comparison (``all(...)``, ``x in (...)``) shows how often it held.

The environment decides the kernels and the precision: on a CPU with AVX-512,
``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
LESSONS_LIB_PRECISION=fp32`` runs AVX2-class kernels in float32, close to an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_LINE = re.compile(r"^SEED = \d+(?=\s*(#.*)?$)", re.MULTILINE)
OPS = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}
FLIPPED = {">": "<", ">=": "<=", "<": ">", "<=": ">="}

RECORDER = '''
import json as _json
_claims = {}

def _claim(key, source, left, op=None, right=None):
    """Record one check instead of asserting it."""
    entry = _claims.setdefault(key, {"source": source, "op": op, "values": []})
    try:
        if op is None:
            entry["values"].append(bool(left()))
        else:
            a, b = left(), right()
            entry["values"].append([float(a), float(b)])
    except Exception as exc:
        entry["values"].append(f"{type(exc).__name__}: {exc}"[:200])
'''


def chapter_path(chapter: str) -> Path:
    matches = sorted((ROOT / "book").glob(f"{int(chapter):02d}_*.ipynb"))
    if not matches:
        raise ValueError(f"no notebook for chapter {chapter!r} in {ROOT / 'book'}")
    return matches[0]


def _conjuncts(test: ast.expr) -> list[ast.expr]:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [part for value in test.values for part in _conjuncts(value)]
    return [test]


class _AssertRecorder(ast.NodeTransformer):
    """``assert a > b and c`` -> ``_claim(key, "a > b", lambda: a, ">", lambda: b);
    _claim(key, "c", lambda: c)``."""

    def __init__(self, cell: int, source: str):
        self.cell, self.source = cell, source

    def visit_Assert(self, node: ast.Assert):
        calls = []
        for k, part in enumerate(_conjuncts(node.test)):
            pieces = [(part, None, None)]
            if (isinstance(part, ast.Compare)
                    and all(type(op) in OPS for op in part.ops)):
                sides = [part.left, *part.comparators]
                pieces = [(sides[i], OPS[type(op)], sides[i + 1]) for i, op in enumerate(part.ops)]
            for m, (left, op, right) in enumerate(pieces):
                text = ast.unparse(left) if op is None else \
                    f"{ast.unparse(left)} {op} {ast.unparse(right)}"
                key = f"cell {self.cell}, line {node.lineno}, part {k}.{m}"
                args = [ast.Constant(key), ast.Constant(text), _thunk(left)]
                if op is not None:
                    args += [ast.Constant(op), _thunk(right)]
                call = ast.Call(ast.Name("_claim", ast.Load()), args, [])
                calls.append(ast.Expr(call))
        return calls


def _thunk(expr: ast.expr) -> ast.Lambda:
    no_args = ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])
    return ast.Lambda(no_args, expr)


def instrument(nb, seed: int, out: Path):
    """The notebook with SEED set, its hidden asserts recording, and a last cell saving them."""
    import nbformat

    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or not SEED_LINE.search(code[0].source):
        raise ValueError("the chapter's first code cell must set `SEED = <int>` on a line of its own "
                         "(and use SEED for everything it trains); this one does not")
    code[0].source = SEED_LINE.sub(f"SEED = {seed}", code[0].source)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "remove-input" not in cell.metadata.get("tags", []):
            continue
        tree = ast.fix_missing_locations(_AssertRecorder(i, cell.source).visit(ast.parse(cell.source)))
        cell.source = ast.unparse(tree)
    nb.cells.insert(0, nbformat.v4.new_code_cell(RECORDER))
    # `times` is the chapters' dict of step -> seconds; a chapter may use the name otherwise
    nb.cells.append(nbformat.v4.new_code_cell(
        "_times = globals().get('times', {})\n"
        "_times = {k: float(v) for k, v in (_times.items() if isinstance(_times, dict) else ())\n"
        "          if isinstance(v, (int, float))}\n"
        f"with open({str(out)!r}, 'w') as _f:\n"
        "    _json.dump({'claims': _claims, 'times': _times}, _f)"))
    return nb


def run_chapter(chapter: str, seed: int, timeout: int = 1200) -> dict:
    import nbformat
    from nbclient import NotebookClient

    path = chapter_path(chapter)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "claims.json"
        nb = instrument(nb, seed, out)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
        errors = [f"cell {i}: {o.get('ename')}: {o.get('evalue')}"[:300]
                  for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  for o in c.get("outputs", []) if o.get("output_type") == "error"]
        saved = json.loads(out.read_text()) if out.exists() else {}
    return {"chapter": path.name, "seed": seed, "seconds": seconds, "errors": errors,
            "claims": saved.get("claims", {}), "times": saved.get("times", {})}


def _margin(op: str, a: float, b: float) -> float:
    return a - b if op in (">", ">=") else b - a


def _holds(op: str, a: float, b: float) -> bool:
    return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per check: its bound and the spread of what the seeds measured."""
    rows = {}
    for run in runs:
        for key, claim in run["claims"].items():
            row = rows.setdefault((run["chapter"], key, claim["source"]), {
                "chapter": run["chapter"], "key": key, "source": claim["source"],
                "op": claim["op"], "per_seed": {}})
            values = claim["values"]
            bad = [v for v in values if isinstance(v, str)]
            if bad:
                row["per_seed"][run["seed"]] = {"held": False, "error": bad[0]}
            elif claim["op"] is None:
                row["per_seed"][run["seed"]] = {"held": all(values)}
            else:   # the worst case over repeated checks (an assert inside a loop)
                a, b = min(values, key=lambda ab: _margin(claim["op"], *ab))
                row["per_seed"][run["seed"]] = {"held": all(_holds(claim["op"], *ab) for ab in values),
                                                "left": a, "right": b,
                                                "margin": _margin(claim["op"], a, b)}
    return list(rows.values())


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return True


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def table(rows: list[dict]) -> str:
    lines = ["| chapter | check | bound | min / median / max | held |",
             "|---|---|---|---|---|"]
    for row in rows:
        seeds = row["per_seed"].values()
        held = f"{sum(s['held'] for s in seeds)}/{len(seeds)}"
        numeric = [s for s in seeds if "left" in s]
        fixed_left = len({s["left"] for s in numeric}) == 1
        if row["op"] is None or not numeric:
            bound, spread = "", ""
        elif (len({s["right"] for s in numeric}) == 1       # a fixed bound on the right
              and not (fixed_left and _is_literal(row["source"].split(f" {row['op']} ")[0]))):
            bound = f"{row['op']} {_fmt(numeric[0]['right'])}"
            left = sorted(s["left"] for s in numeric)
            spread = " / ".join(_fmt(v) for v in (left[0], statistics.median(left), left[-1]))
        elif fixed_left:                                    # ... or on the left: 0.5 < x
            bound = f"{FLIPPED[row['op']]} {_fmt(numeric[0]['left'])}"
            right = sorted(s["right"] for s in numeric)
            spread = " / ".join(_fmt(v) for v in (right[0], statistics.median(right), right[-1]))
        else:                                                # two measured sides
            bound = "margin > 0"
            m = sorted(s["margin"] for s in numeric)
            spread = " / ".join(_fmt(v) for v in (m[0], statistics.median(m), m[-1]))
        source = row["source"].replace("|", "\\|")
        if len(source) > 70:
            source = source[:67] + "..."
        lines.append(f"| {row['chapter'][:2]} | `{source}` | {bound} | {spread} | {held} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapters", nargs="+", required=True, help="chapter numbers, e.g. 10 11")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, help="also save every run's records as JSON here")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args(argv)
    runs = []
    for chapter in args.chapters:
        for seed in args.seeds:
            run = run_chapter(chapter, seed, args.timeout)
            runs.append(run)
            failed = sum(1 for c in run["claims"].values()
                         for v in c["values"] if v is False or isinstance(v, str)
                         or (isinstance(v, list) and not _holds(c["op"], *v)))
            print(f"{run['chapter']} seed {seed}: {run['seconds']:.0f} s, "
                  f"{failed} check(s) failed, {len(run['errors'])} cell error(s)", flush=True)
            if run["times"]:
                print("    times:", ", ".join(f"{k} {v:.1f} s" for k, v in run["times"].items()),
                      flush=True)
            for err in run["errors"]:
                print("    ", err, flush=True)
            if args.out:
                args.out.write_text(json.dumps(runs, indent=1))
    print()
    print(table(summarise(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
