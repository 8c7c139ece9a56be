"""Reading the library's own code: how many lines a function or class takes."""

from __future__ import annotations

import ast
import inspect
import textwrap

__all__ = ["code_lines"]


def code_lines(*objects) -> int:
    """The lines of code of functions or classes, summed: blank lines, comment lines and
    docstrings (of the objects and of everything defined inside them) left out."""
    if not objects:
        raise ValueError("code_lines needs at least one function or class")
    total = 0
    for obj in objects:
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)):
            raise ValueError(f"expected functions or classes, got {type(obj).__name__}")
        source = textwrap.dedent(inspect.getsource(obj))
        docstrings = set()
        for node in ast.walk(ast.parse(source)):
            body = getattr(node, "body", None)
            first = body[0] if isinstance(body, list) and body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
        total += sum(1 for n, line in enumerate(source.splitlines(), 1)
                     if line.strip() and not line.strip().startswith("#")
                     and n not in docstrings)
    return total
