"""Checkers for chapter 08's exercises (scaling laws).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (forward-only FLOPs, a fit in
linear instead of log space, a forgotten square root, ``C`` where ``C / 6`` belongs).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._core import Case, CheckFailed, _short, compare_close, compare_equal, run_cases  # noqa: F401

__all__ = [
    "check_training_flops",
    "check_loglog_fit",
    "check_chinchilla_rule",
    "check_optimal_size",
]


# -----------------------------------------------------------------------------
# helpers


def _number(got) -> tuple[float | None, str | None]:
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return float(got.detach().reshape(())), None
    if isinstance(got, np.ndarray) and got.size == 1:
        return float(got.reshape(())), None
    if isinstance(got, bool) or not isinstance(got, (int, float, np.integer, np.floating)):
        return None, f"expected a single number, got {_short(got)}"
    value = float(got)
    if not math.isfinite(value):
        return None, f"expected a finite number, got {value}"
    return value, None


def _pair(got, names: tuple[str, str]) -> tuple[tuple[float, float] | None, str | None]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return None, f"expected a pair ({names[0]}, {names[1]}), got {_short(got)}"
    values = []
    for name, item in zip(names, got):
        value, problem = _number(item)
        if problem:
            return None, f"{name}: {problem}"
        values.append(value)
    return (values[0], values[1]), None


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


# -----------------------------------------------------------------------------
# exercise 1: training FLOPs from a configuration


def _flops(n_layer, d_model, tokens):
    return 6 * 12 * n_layer * d_model ** 2 * tokens


def _compare_flops(n_layer, d_model, tokens):
    def compare(got, expected) -> str | None:
        value, problem = _number(got)
        if problem:
            return problem
        if _close(value, expected, 1e-6):
            return None
        N = 12 * n_layer * d_model ** 2
        if _close(value, 2 * N * tokens, 1e-6):
            return (f"expected {expected:.4g}, got {value:.4g}, a third of it. Either that is 2 N D, the "
                    f"forward pass only (the backward pass costs about twice the forward: a gradient for "
                    f"the inputs and one for the weights, so training is 6 N D), or N counts attention's "
                    f"4 d^2 per layer without the MLP's 8 d^2 (d -> 4d -> d)")
        if _close(value, 6 * 12 * d_model ** 2 * tokens, 1e-6) and n_layer != 1:
            return f"expected {expected:.4g}, got {value:.4g}: that is one layer's worth; multiply by n_layer"
        if _close(value, 6 * 12 * n_layer * d_model * tokens, 1e-6):
            return f"expected {expected:.4g}, got {value:.4g}: square d_model (a d x d matrix has d^2 weights)"
        return f"expected about {expected:.6g}, got {value:.6g}"
    return compare


def check_training_flops(fn) -> None:
    """Grade ``fn(n_layer, d_model, tokens) -> float``: the training FLOPs ``6 N D`` with
    Kaplan's approximation ``N = 12 n_layer d_model**2`` for the non-embedding parameters."""
    __tracebackhide__ = True
    shapes = [(1, 16, 1000, "a one-layer model 16 wide on 1,000 tokens"),
              (4, 64, 2_000_000, "4 layers 64 wide on 2 million tokens"),
              (12, 768, 300e9, "GPT-2 small's shape on 300 billion tokens"),
              (96, 12288, 300e9, "GPT-3 175B on its 300 billion tokens")]
    cases = [Case(desc, args=(L, d, D), expected=_flops(L, d, D), compare=_compare_flops(L, d, D),
                  hint="each parameter does one multiply-add (2 FLOPs) per token forward and two backward")
             for L, d, D, desc in shapes]
    run_cases("check_training_flops", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: a straight line in log-log axes, by hand


def _loglog_reference(x, y):
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    slope = np.sum((lx - lx.mean()) * (ly - ly.mean())) / np.sum((lx - lx.mean()) ** 2)
    intercept = ly.mean() - slope * lx.mean()
    return float(-slope), float(math.exp(intercept))


def _compare_loglog(x, y):
    def compare(got, expected) -> str | None:
        pair, problem = _pair(got, ("alpha", "A"))
        if problem:
            return problem
        alpha, A = pair
        e_alpha, e_A = expected
        if _close(alpha, -e_alpha, 1e-6) and abs(e_alpha) > 1e-9:
            return (f"expected alpha = {e_alpha:.6g}, got {alpha:.6g}: the sign is flipped. L = A / x^alpha "
                    f"falls with x, so alpha is minus the slope of log L against log x")
        lx, ly = np.log10(np.asarray(x, dtype=np.float64)), np.log10(np.asarray(y, dtype=np.float64))
        slope10, icept10 = np.polyfit(lx, ly, 1)
        if _close(alpha, e_alpha, 1e-6) and _close(A, icept10, 1e-6):
            return (f"alpha is right, but A = {A:.6g} is the intercept itself; A is e**intercept "
                    f"(or 10**intercept if you used log10), expected {e_A:.6g}")
        if _close(alpha, e_alpha, 1e-6) and _close(A, math.log(e_A), 1e-6):
            return (f"alpha is right, but A = {A:.6g} is log A; exponentiate the intercept, "
                    f"expected {e_A:.6g}")
        linear = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)[0]
        if _close(alpha, -linear, 1e-6) or _close(alpha, linear, 1e-6):
            return ("that is the slope of a straight line through (x, L) itself; a power law is a "
                    "straight line only after taking the log of both x and L")
        if not _close(alpha, e_alpha, 1e-6):
            return f"expected alpha = {e_alpha:.6g}, got {alpha:.6g}"
        if not _close(A, e_A, 1e-6):
            return f"alpha is right; expected A = {e_A:.6g}, got {A:.6g}"
        return None
    return compare


def check_loglog_fit(fn) -> None:
    """Grade ``fn(x, loss) -> (alpha, A)``: least squares of ``log loss = log A - alpha log x``
    (a straight line in log-log axes). ``x`` and ``loss`` arrive as 1-D float64 tensors."""
    __tracebackhide__ = True
    rng = np.random.default_rng(8)
    sets = []
    x = np.array([1e3, 1e4, 1e5])
    sets.append((x, 5.0 * x ** -0.1, "three points on an exact power law, alpha = 0.1"))
    x = np.geomspace(3e3, 2e5, 7)
    sets.append((x, 2.0 + 40 * x ** -0.4, "seven model sizes whose losses bend towards a floor"))
    x = np.geomspace(1e6, 1e9, 12)
    sets.append((x, 9.0 * x ** -0.076 * np.exp(rng.normal(0, 0.01, 12)), "noisy losses, Kaplan's slope"))
    x = np.array([10.0, 20.0, 40.0, 80.0])
    sets.append((x, np.array([1.0, 2.0, 4.0, 8.0]), "losses that grow with x (alpha is then negative)"))
    cases = [Case(desc, args=(torch.tensor(x), torch.tensor(y)), expected=_loglog_reference(x, y),
                  compare=_compare_loglog(x, y),
                  hint="take u = log x and v = log loss; slope = cov(u, v) / var(u); alpha = -slope, "
                       "A = exp(mean(v) - slope * mean(u))")
             for x, y, desc in sets]
    run_cases("check_loglog_fit", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: Chinchilla's rule of thumb


def _rule(C, tokens_per_param):
    N = math.sqrt(C / (6 * tokens_per_param))
    return N, tokens_per_param * N


def _compare_rule(C, r):
    def compare(got, expected) -> str | None:
        pair, problem = _pair(got, ("N", "D"))
        if problem:
            return problem
        N, D = pair
        eN, eD = expected
        if _close(N, eN, 1e-6) and _close(D, eD, 1e-6):
            return None
        if _close(N, C / (6 * r), 1e-6):
            return ("N came out as C / (6 r): with D = r N the budget is C = 6 r N^2, so N is the "
                    "square root of C / (6 r)")
        if _close(N, math.sqrt(C / r), 1e-6):
            return "N came out as sqrt(C / r): you forgot the 6 in C = 6 N D"
        if _close(N, eD, 1e-6) and _close(D, eN, 1e-6):
            return "N and D are swapped: return (parameters, tokens), with D = r N the larger one"
        if not _close(6 * N * D, C, 1e-6):
            return (f"6 N D = {6 * N * D:.4g} does not spend the budget C = {C:.4g}\n"
                    f"  expected N = {eN:.6g}, D = {eD:.6g}; got N = {N:.6g}, D = {D:.6g}")
        return f"expected N = {eN:.6g}, D = {eD:.6g}; got N = {N:.6g}, D = {D:.6g}"
    return compare


def check_chinchilla_rule(fn) -> None:
    """Grade ``fn(C, tokens_per_param=20) -> (N, D)``: the model size and token count that spend the
    budget ``C = 6 N D`` with ``D = tokens_per_param * N``."""
    __tracebackhide__ = True
    budgets = [(5.88e23, 20, "Chinchilla's budget (70B parameters, 1.4T tokens)"),
               (3.14e23, 20, "GPT-3's budget"),
               (1e12, 20, "a laptop-sized budget of 1e12 FLOPs"),
               (1e21, 100, "1e21 FLOPs at 100 tokens per parameter")]
    cases = [Case(desc, args=(C,), kwargs={"tokens_per_param": r}, expected=_rule(C, r),
                  compare=_compare_rule(C, r),
                  hint="substitute D = r N into C = 6 N D and solve for N")
             for C, r, desc in budgets]
    run_cases("check_chinchilla_rule", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: the best N and D for a budget, from a fitted L(N, D)


def _optimal(C, fit):
    a, b = fit["alpha"], fit["beta"]
    G = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    return N, C / (6 * N)


def _compare_optimal(C, fit):
    def compare(got, expected) -> str | None:
        pair, problem = _pair(got, ("N", "D"))
        if problem:
            return problem
        N, D = pair
        eN, eD = expected
        if _close(N, eN, 1e-4) and _close(D, eD, 1e-4):
            return None
        if _close(N, eD, 1e-4) and _close(D, eN, 1e-4):
            return ("N and D are swapped (or, the same thing, alpha/A with beta/B): A / N^alpha is the "
                    "parameter term, B / D^beta the data term; return (N, D)")
        a, b = fit["alpha"], fit["beta"]
        wrong_c = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b)) * C ** (b / (a + b))
        if _close(N, wrong_c, 1e-4):
            return "N uses C where C / 6 belongs: along the budget, N D = C / 6"
        if not _close(6 * N * D, C, 1e-4):
            return f"6 N D = {6 * N * D:.4g} does not equal the budget C = {C:.4g}"
        return f"expected N = {eN:.6g}, D = {eD:.6g}; got N = {N:.6g}, D = {D:.6g}"
    return compare


def check_optimal_size(fn) -> None:
    """Grade ``fn(C, fit) -> (N, D)``: the ``N`` and ``D = C / (6 N)`` that minimise
    ``E + A / N**alpha + B / D**beta``; ``fit`` is a dict with E, A, B, alpha and beta."""
    __tracebackhide__ = True
    chinchilla = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    refit = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
    lopsided = {"E": 0.5, "A": 3.0, "B": 80.0, "alpha": 0.5, "beta": 0.2}
    settings = [(5.76e23, chinchilla, "Gopher's budget with Chinchilla's published fit"),
                (1e20, refit, "1e20 FLOPs with Besiroglu et al.'s refit"),
                (1e12, lopsided, "1e12 FLOPs with an invented fit whose exponents differ a lot"),
                (3.14e23, refit, "GPT-3's budget with the refit")]
    cases = [Case(desc, args=(C, dict(fit)), expected=_optimal(C, fit), compare=_compare_optimal(C, fit),
                  hint="put D = C / (6 N) into the loss, set its derivative in N to zero (or minimise "
                       "numerically over log N), then D = C / (6 N)")
             for C, fit, desc in settings]
    run_cases("check_optimal_size", fn, cases)
