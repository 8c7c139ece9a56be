"""The machinery every checker shares: run hidden cases, compare, explain kindly.

A checker calls :func:`run_cases` with the learner's function and a list of :class:`Case`.
On success it prints ``all N checks passed`` and returns None. On the first failing case it
raises :class:`CheckFailed` with a message that says which input failed, what was expected
and what came back, and (where it can) a hint.

Policy, for every chapter's checkers:

- **Independent references.** The expected answer comes from a direct computation written in
  the checker (or from PyTorch / a formula stated in the exercise), never from the lessons_lib
  function the exercise teaches: a bug there must not become the answer key.
- **Reproducible failures.** A failing case names its input: small inputs are printed, and a
  random case carries ``rebuild``, one line of Python that rebuilds exactly its arguments
  (seeded), so the learner can rerun that case by hand.
- **The learner's traceback is kept.** When their function raises, :class:`CheckFailed` is
  chained to their exception (``raise ... from err``), so Jupyter shows the line in their code
  that failed, under the checker's explanation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checks import is_int


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
    rebuild: str = ""                # one line of Python that rebuilds args (random cases)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every random case is rebuilt from its seed."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.randn(*shape, generator=torch.Generator().manual_seed(seed))``, as rebuild
    lines spell it (see :func:`randn_call`)."""
    return torch.randn(*shape, generator=generator(seed), dtype=dtype)


def randn_call(*shape: int, seed: int) -> str:
    """The one-line call a learner can paste to rebuild ``randn(*shape, seed=seed)``."""
    dims = ", ".join(str(n) for n in shape)
    return f"torch.randn({dims}, generator=torch.Generator().manual_seed({seed}))"


def randint(high: int, n: int, seed: int) -> torch.Tensor:
    """``n`` ids in ``0..high-1`` from a generator seeded with ``seed`` (see :func:`randint_call`)."""
    return torch.randint(high, (n,), generator=generator(seed))


def randint_call(high: int, n: int, seed: int) -> str:
    """The one-line call a learner can paste to rebuild ``randint(high, n, seed=seed)``."""
    return f"torch.randint({high}, ({n},), generator=torch.Generator().manual_seed({seed}))"


def as_number(got, what: str = "a single number") -> tuple[float | None, str | None]:
    """A finite float out of an int, a float, a NumPy scalar or a one-element tensor/array;
    otherwise ``(None, message)`` that says what came instead."""
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            return None, (f"expected {what}, got a tensor of shape {tuple(got.shape)}"
                          + (". Did you forget to average?" if got.numel() > 1 else ""))
        got = got.detach().reshape(()).item()
    try:
        import numpy as np
        if isinstance(got, np.ndarray):
            if got.size != 1:
                return None, f"expected {what}, got an array of shape {got.shape}"
            got = got.reshape(()).item()
        if isinstance(got, (np.integer, np.floating)):
            got = got.item()
    except ImportError:                 # pragma: no cover - numpy ships with torch's users
        pass
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return None, f"expected {what}, got {_short(got)}"
    value = float(got)
    if math.isnan(value):
        return None, (f"expected {what}, got nan (not a number); nan usually comes from "
                      "0/0 or inf - inf somewhere in the computation")
    if math.isinf(value):
        return None, f"expected {what}, got {value}"
    return value, None


def as_int(got, what: str = "a whole number (an int)") -> tuple[int | None, str | None]:
    """An int out of an int, a whole float or a one-element integer tensor; else a message."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.detach().reshape(()).item()
    try:
        import numpy as np
        if isinstance(got, np.integer):
            got = int(got)
        elif isinstance(got, np.floating):
            got = float(got)
    except ImportError:                 # pragma: no cover
        pass
    if isinstance(got, float) and got.is_integer():
        got = int(got)
    if not is_int(got):
        return None, f"expected {what}, got {_short(got)}"
    return got, None


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


def floats(x) -> list[float]:
    """A tensor's (or a sequence's) values as a list of Python floats: what references written
    with plain floats and loops read."""
    return [float(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def near(a, b, tol: float = 1e-5) -> bool:
    """Whether two lists of floats have the same length and values within ``tol``."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=tol, abs_tol=tol)
                                    for x, y in zip(a, b))


def _infinite(got) -> bool:
    """Whether ``got`` is a single number that is +inf or -inf."""
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            return False
        got = got.detach().reshape(()).item()
    try:
        return math.isinf(float(got))
    except (TypeError, ValueError):
        return False


def number_close(rtol: float = 1e-5, atol: float = 1e-6, slips=None, infinite: str = ""):
    """A comparison for :class:`Case`: a single number close to the expected one.
    ``slips(got) -> message or None`` names a known mistake when the number is wrong;
    ``infinite``, if given, is said when the answer is +-inf (an underflowed log, say)."""
    def compare(got, expected) -> str | None:
        if infinite and _infinite(got):
            return f"expected about {expected:.6g}, got {_short(got)}: {infinite}"
        value, problem = as_number(got)
        if problem:
            return problem
        if math.isclose(value, expected, rel_tol=rtol, abs_tol=atol):
            return None
        message = f"expected about {expected:.6g}, got {value:.6g}"
        named = slips(value) if slips else None
        return f"{message}: {named}" if named else message
    return compare


def tensor_close(rtol: float = 1e-5, atol: float = 1e-5, slips=None):
    """A comparison for :class:`Case`: a tensor of the expected shape and values (as
    :func:`compare_close`); ``slips(got as float64) -> message or None`` names a known
    mistake when the values are wrong."""
    close = compare_close(rtol, atol)

    def compare(got, expected) -> str | None:
        problem = close(got, expected)
        if problem is None or not isinstance(got, torch.Tensor) \
                or got.shape != expected.shape:
            return problem
        named = slips(got.detach().double()) if slips else None
        return f"{problem}\n  {named}" if named else problem
    return compare


def _inputs(case: Case) -> str:
    """How the learner rebuilds the failing case: the rebuild line, or the inputs if small."""
    if case.rebuild:
        return f"\nTo rerun this case: {case.rebuild}"
    parts = [_short(a, limit=120) for a in case.args]
    parts += [f"{k}={_short(v, limit=120)}" for k, v in case.kwargs.items()]
    text = ", ".join(parts)
    return f"\nInputs: ({text})" if text and len(text) <= 400 else ""


def run_cases(exercise: str, fn: Callable, cases: list[Case]) -> None:
    """Run ``fn`` on every case; print a success line, or raise on the first failure."""
    __tracebackhide__ = True
    if not callable(fn):
        raise CheckFailed(f"{exercise}: pass your function itself (without calling it), got {_short(fn)}")
    for i, case in enumerate(cases, 1):
        hint = f"\nHint: {case.hint}" if case.hint else ""
        try:
            got = fn(*case.args, **case.kwargs)
        except Exception as err:          # the learner's code failed: keep their traceback
            raise CheckFailed(
                f"{exercise}: check {i} of {len(cases)} ({case.description}) raised "
                f"{type(err).__name__}: {err}{_inputs(case)}{hint}\n"
                "(The traceback above this message shows the line in your code.)") from err
        problem = (case.compare or compare_equal)(got, case.expected)
        if problem:
            raise CheckFailed(
                f"{exercise}: not yet. Check {i} of {len(cases)} failed, on {case.description}:\n"
                f"  {problem}{_inputs(case)}{hint}")
    print(f"{exercise}: all {len(cases)} checks passed")
