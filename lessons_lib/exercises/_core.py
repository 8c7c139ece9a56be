"""The machinery every checker shares: run hidden cases, compare, explain kindly.

A checker calls :func:`run_cases` with the learner's function and a list of :class:`Case`.
On success it prints ``all N checks passed`` and returns None. On the first failing case it
raises :class:`CheckFailed` with a message that says which input failed, what was expected
and what came back, and (where it can) a hint. The traceback hides the checker's own frames,
so the learner sees only their cell and the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class CheckFailed(AssertionError):
    """A learner's answer did not pass a check; the message says why."""


@dataclass
class Case:
    description: str                 # what the input is, in words a learner understands
    args: tuple = ()
    expected: Any = None
    kwargs: dict = field(default_factory=dict)
    hint: str = ""
    compare: Callable[[Any, Any], str | None] | None = None   # returns a problem, or None


def _short(value, limit: int = 300) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
        if value.numel() <= 24:
            text += f": {value.tolist()}"
        return text
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def compare_equal(got, expected) -> str | None:
    if got == expected:
        return None
    if type(got) is not type(expected):
        return f"expected a {type(expected).__name__}, got a {type(got).__name__}: {_short(got)}"
    return f"expected {_short(expected)}\n     got {_short(got)}"


def compare_close(rtol: float = 1e-4, atol: float = 1e-5):
    """Numbers or tensors equal within tolerance, with the shape checked first."""
    def compare(got, expected) -> str | None:
        if isinstance(expected, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return f"expected a torch.Tensor, got a {type(got).__name__}"
            if tuple(got.shape) != tuple(expected.shape):
                return f"expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}"
            if not torch.allclose(got.to(expected.dtype), expected, rtol=rtol, atol=atol, equal_nan=False):
                worst = (got.to(expected.dtype) - expected).abs().max().item()
                return (f"the values differ (largest difference {worst:.3g})\n"
                        f"expected {_short(expected)}\n     got {_short(got)}")
            return None
        try:
            ok = math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol)
        except (TypeError, ValueError):
            return f"expected a number close to {expected!r}, got {_short(got)}"
        return None if ok else f"expected about {expected:.6g}, got {float(got):.6g}"
    return compare


def run_cases(exercise: str, fn: Callable, cases: list[Case]) -> None:
    __tracebackhide__ = True
    if not callable(fn):
        raise CheckFailed(f"{exercise}: pass your function itself (without calling it), got {_short(fn)}")
    for i, case in enumerate(cases, 1):
        try:
            got = fn(*case.args, **case.kwargs)
        except Exception as err:          # the learner's code failed: say where, kindly
            raise CheckFailed(
                f"{exercise}: check {i} of {len(cases)} ({case.description}) raised "
                f"{type(err).__name__}: {err}" + (f"\nHint: {case.hint}" if case.hint else "")) from None
        problem = (case.compare or compare_equal)(got, case.expected)
        if problem:
            raise CheckFailed(
                f"{exercise}: not yet. Check {i} of {len(cases)} failed, on {case.description}:\n"
                f"  {problem}" + (f"\nHint: {case.hint}" if case.hint else ""))
    print(f"{exercise}: all {len(cases)} checks passed")
