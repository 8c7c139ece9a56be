"""Checkers for chapter 08's exercises (scaling laws).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (a fit in linear instead of log
space, runs scanned in the wrong order, swapped terms, ``C`` where ``C / 6`` belongs).

The references are written here, independently of :mod:`lessons_lib.scaling`: a least-squares
line for the log-log fit, a direct pairwise comparison for the frontier, a variable-projection
search (exponents on a grid, the linear coefficients by least squares) refined in log space for
the loss surface, and the closed form of Hoffmann et al.'s eq. 4 for the optimal size. Only the
published constants come from :mod:`lessons_lib.scaling`, where they are defined once.

Every case can be rebuilt by hand: ``exercise_inputs(name, k)`` returns the arguments of case
``k`` (counted from 1) of checker ``name``, and a failing case prints that line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import least_squares

from ..checks import is_int
from ..scaling import BESIROGLU_2024, CHINCHILLA_2022
from ._core import Case, _short, as_number, generator, run_cases

__all__ = [
    "check_loglog_fit",
    "check_compute_frontier",
    "check_loss_surface",
    "check_optimal_size",
]


def _pair(got, names: tuple[str, str]) -> tuple[tuple[float, float] | None, str | None]:
    """Two finite numbers out of a tuple or list, or a message that says what came instead."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return None, f"expected a pair ({names[0]}, {names[1]}), got {_short(got)}"
    values = []
    for name, item in zip(names, got):
        value, problem = as_number(item, f"a single number for {name}")
        if problem:
            return None, f"{name}: {problem}"
        values.append(value)
    return (values[0], values[1]), None


def _rebuild(name: str, k: int, targets: str, args: tuple) -> str:
    """The line that rebuilds case ``k``'s arguments; empty when they are short enough to print."""
    if all(len(a) <= 8 for a in args if isinstance(a, (list, tuple, np.ndarray, torch.Tensor))):
        return ""
    return (f"from lessons_lib.exercises.ch08 import exercise_inputs; "
            f"{targets} = exercise_inputs({name!r}, {k})")


# One run of this chapter's sweeps at SCALE = 1 (all parameters, tokens, validation loss), kept
# here so that a checker can try the learner's code on data like theirs.
_CHAPTER_RUNS = [
    (1912, 399872, 2.575), (5360, 399872, 2.364), (17568, 399872, 2.308),
    (29568, 399872, 2.290), (62784, 399872, 2.241), (108288, 399872, 2.176),
    (29568, 57344, 2.905), (29568, 114176, 2.575), (29568, 228352, 2.396),
    (29568, 849408, 2.023), (8640, 1369088, 2.189), (17568, 673280, 2.149),
    (62784, 188416, 2.472), (17568, 1429504, 2.070), (108288, 231936, 2.363),
]


def _chapter_runs():
    N, D, L = (np.array(column, dtype=np.float64) for column in zip(*_CHAPTER_RUNS))
    return N, D, L


# -----------------------------------------------------------------------------
# exercise 1: a straight line in log-log axes, by hand


def _loglog_inputs():
    noise = torch.randn(12, generator=generator(8), dtype=torch.float64)
    x12 = torch.logspace(6, 9, 12, dtype=torch.float64)
    x7 = torch.tensor(np.geomspace(3e3, 2e5, 7))
    x3 = torch.tensor([1e3, 1e4, 1e5], dtype=torch.float64)
    x4 = torch.tensor([10.0, 20.0, 40.0, 80.0], dtype=torch.float64)
    return [
        ((x3, 5.0 * x3 ** -0.1), "three points on an exact power law, alpha = 0.1"),
        ((x7, 2.0 + 40 * x7 ** -0.4), "seven model sizes whose losses bend towards a floor"),
        ((x12, 9.0 * x12 ** -0.076 * torch.exp(0.01 * noise)),
         "noisy losses (seeded), Kaplan's slope"),
        ((x4, torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)),
         "losses that grow with x (alpha is then negative)"),
    ]


def _loglog_reference(x, y):
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    slope = np.sum((lx - lx.mean()) * (ly - ly.mean())) / np.sum((lx - lx.mean()) ** 2)
    intercept = ly.mean() - slope * lx.mean()
    return float(-slope), float(math.exp(intercept))


def _compare_loglog(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def close(a, b):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)

    def compare(got, expected) -> str | None:
        pair, problem = _pair(got, ("alpha", "A"))
        if problem:
            return problem
        alpha, A = pair
        e_alpha, e_A = expected
        if close(alpha, e_alpha) and close(A, e_A):
            return None
        if close(alpha, -e_alpha) and abs(e_alpha) > 1e-9:
            return (f"expected alpha = {e_alpha:.6g}, got {alpha:.6g}: the sign is flipped. "
                    f"L = A / x^alpha falls with x, so alpha is minus the slope of log L "
                    f"against log x")
        icept10 = np.polyfit(np.log10(x), np.log10(y), 1)[1]
        if close(alpha, e_alpha) and close(A, icept10):
            return (f"alpha is right, but A = {A:.6g} is the intercept itself; A is "
                    f"e**intercept (or 10**intercept if you used log10), expected {e_A:.6g}")
        if close(alpha, e_alpha) and close(A, math.log(e_A)):
            return (f"alpha is right, but A = {A:.6g} is log A; exponentiate the intercept, "
                    f"expected {e_A:.6g}")
        linear = np.polyfit(x, y, 1)[0]
        if close(alpha, -linear) or close(alpha, linear):
            return ("that is the slope of a straight line through (x, L) itself; a power law "
                    "is a straight line only after taking the log of both x and L")
        if not close(alpha, e_alpha):
            return f"expected alpha = {e_alpha:.6g}, got {alpha:.6g}"
        return f"alpha is right; expected A = {e_A:.6g}, got {A:.6g}"
    return compare


def check_loglog_fit(fn) -> None:
    """Grade ``fn(x, loss) -> (alpha, A)`` (the notebook's ``fit_loglog_line``): least squares of
    ``log loss = log A - alpha log x`` (a straight line in log-log axes). ``x`` and ``loss``
    arrive as 1-D float64 tensors."""
    __tracebackhide__ = True
    cases = [Case(desc, args=(x, y), expected=_loglog_reference(x, y),
                  compare=_compare_loglog(x, y), rebuild=_rebuild("loglog_fit", k, "x, loss", (x, y)),
                  hint="take u = log x and v = log loss; slope = cov(u, v) / var(u); "
                       "alpha = -slope, A = exp(mean(v) - slope * mean(u))")
             for k, ((x, y), desc) in enumerate(_loglog_inputs(), 1)]
    run_cases("check_loglog_fit", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the compute-efficient frontier


def _frontier_inputs():
    N, D, L = _chapter_runs()
    rng = np.random.default_rng(0)           # only for a fixed shuffle of the chapter's runs
    order = rng.permutation(len(L))
    g = generator(82)
    n = torch.exp(torch.empty(30, dtype=torch.float64).uniform_(math.log(1e3), math.log(1e5),
                                                                 generator=g))
    d = torch.exp(torch.empty(30, dtype=torch.float64).uniform_(math.log(1e5), math.log(3e6),
                                                                 generator=g))
    noise = 0.02 * torch.randn(30, generator=g, dtype=torch.float64)
    loss = 1.5 + 20 * n ** -0.3 + 300 * d ** -0.4 + noise
    return [
        (([1e9, 2e9, 4e9, 8e9], [3.0, 2.7, 2.8, 2.5]),
         "four models, the third worse than the second"),
        (([8e9, 1e9, 4e9, 2e9], [2.5, 3.0, 2.4, 2.7]),
         "four models, not in order of compute"),
        (((6 * N * D)[order].tolist(), L[order].tolist()),
         "fifteen runs like this chapter's, shuffled"),
        (((6 * n * d).numpy(), loss.numpy()),
         "thirty random runs (seeded) as NumPy arrays"),
    ]


def _frontier_reference(C, loss):
    C, loss = np.asarray(C, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    on = [i for i in range(len(C))
          if not any(j != i and C[j] <= C[i] and loss[j] <= loss[i] for j in range(len(C)))]
    return sorted(on, key=lambda i: C[i])


def _as_indices(got) -> tuple[list[int] | None, str | None]:
    if isinstance(got, torch.Tensor):
        if got.dtype == torch.bool:
            return None, ("got a boolean mask; return the indices of the runs on the frontier "
                          "(torch.nonzero(mask).flatten().tolist() turns a mask into them)")
        got = got.tolist()
    elif isinstance(got, np.ndarray):
        if got.dtype == bool:
            return None, ("got a boolean mask; return the indices of the runs on the frontier "
                          "(np.flatnonzero(mask).tolist() turns a mask into them)")
        got = got.tolist()
    if not isinstance(got, (list, tuple)):
        return None, f"expected a list of indices, got {_short(got)}"
    out = []
    for item in got:
        if isinstance(item, (bool, np.bool_)):
            return None, ("got a list of True/False; return the indices of the runs on the "
                          "frontier instead")
        if isinstance(item, np.integer):
            item = int(item)
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if not isinstance(item, int):
            return None, f"expected a list of int indices, got an item {_short(item)}"
        out.append(item)
    return out, None


def _compare_frontier(C, loss):
    C, loss = np.asarray(C, dtype=np.float64), np.asarray(loss, dtype=np.float64)

    def compare(got, expected) -> str | None:
        got, problem = _as_indices(got)
        if problem:
            return problem
        if got == expected:
            return None
        order = sorted(range(len(C)), key=lambda i: C[i])
        if got == [order.index(i) for i in expected]:
            return ("those are positions in the runs sorted by compute; return indices into "
                    "the arrays as they were given (sort the indices, not the arrays)")
        if sorted(got) == sorted(expected):
            return (f"the right runs, in the wrong order: list them by increasing compute, "
                    f"{expected}")
        unsorted = [i for i in range(len(C)) if all(loss[i] < loss[j] for j in range(i))]
        if got == unsorted and got != expected:
            return ("you scanned the runs in the order they were given; a run is judged "
                    "against every run that cost less, so sort by compute first")
        previous = [i for k, i in enumerate(order) if k == 0 or loss[i] < loss[order[k - 1]]]
        if got == previous:
            return ("you compared each run with the one just before it; compare with the "
                    "lowest loss of every cheaper run (the best so far)")
        missing = [i for i in expected if i not in got]
        extra = [i for i in got if i not in expected]
        text = f"expected {expected}, got {got}"
        if extra:
            i = extra[0]
            beaters = [j for j in range(len(C)) if j != i and C[j] <= C[i] and loss[j] <= loss[i]]
            text += (f"\n  run {i} (C = {C[i]:.4g}, loss {loss[i]:.4g}) is not on the frontier: "
                     f"run {beaters[0]} cost {C[beaters[0]]:.4g} and reached {loss[beaters[0]]:.4g}")
        elif missing:
            i = missing[0]
            text += (f"\n  run {i} (C = {C[i]:.4g}, loss {loss[i]:.4g}) is missing: no run that "
                     f"cost as little reached a loss as low")
        return text
    return compare


def check_compute_frontier(fn) -> None:
    """Grade ``fn(C, loss) -> list of indices``: the runs on the compute-efficient frontier (no
    other run reached a loss as low or lower with as little compute or less), by increasing
    ``C``. ``C`` and ``loss`` are 1-D lists or arrays of floats."""
    __tracebackhide__ = True
    cases = [Case(desc, args=(C, loss), expected=_frontier_reference(C, loss),
                  compare=_compare_frontier(C, loss),
                  rebuild=_rebuild("compute_frontier", k, "C, loss", (C, loss)),
                  hint="sort the indices by compute, walk through them and keep a run when "
                       "its loss is below the best loss seen so far")
             for k, ((C, loss), desc) in enumerate(_frontier_inputs(), 1)]
    run_cases("check_compute_frontier", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: fit the loss surface L(N, D) = E + A / N^alpha + B / D^beta


def _surface_inputs():
    N, D, L = _chapter_runs()
    sizes = np.geomspace(7e7, 1.6e10, 6)
    budgets = np.geomspace(6e18, 3e21, 4)
    n_grid = np.array([n for _ in budgets for n in sizes])
    d_grid = np.array([C / (6 * n) for C in budgets for n in sizes])
    published = dict(CHINCHILLA_2022)
    exact = (published["E"] + published["A"] * n_grid ** -published["alpha"]
             + published["B"] * d_grid ** -published["beta"])
    g = generator(83)
    n = torch.exp(torch.empty(20, dtype=torch.float64).uniform_(math.log(2e3), math.log(1e5),
                                                                 generator=g))
    d = torch.exp(torch.empty(20, dtype=torch.float64).uniform_(math.log(1e5), math.log(2e6),
                                                                 generator=g))
    noise = torch.exp(0.01 * torch.randn(20, generator=g, dtype=torch.float64))
    noisy = (1.4 + 15 * n ** -0.35 + 200 * d ** -0.45) * noise
    return [
        ((n_grid, d_grid, exact),
         "24 runs whose losses follow Chinchilla's published fit exactly (70M to 16B parameters)"),
        ((n.numpy(), d.numpy(), noisy.numpy()),
         "20 tiny runs (seeded) with 1% noise on the loss"),
        ((N, D, L), "this chapter's fifteen runs, from one run of its sweeps"),
    ]


def _surface_predict(fit, N, D):
    return fit["E"] + fit["A"] * N ** -fit["alpha"] + fit["B"] * D ** -fit["beta"]


def _log_rms(fit, N, D, L) -> float:
    with np.errstate(all="ignore"):
        pred = _surface_predict(fit, N, D)
        if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
            return math.inf
        return float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2)))


def _surface_reference(N, D, L) -> dict:
    """Variable projection: for each (alpha, beta) on a grid, E, A and B follow by linear least
    squares; the best few grid points are then refined in log space."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    sN, sD = np.exp(np.log(N).mean()), np.exp(np.log(D).mean())
    n, d = N / sN, D / sD
    grid = np.linspace(0.02, 1.5, 38)
    alpha, beta = np.meshgrid(grid, grid, indexing="ij")
    X = np.stack([np.ones((*alpha.shape, len(L))), n ** -alpha[..., None],
                  d ** -beta[..., None]], axis=-1)          # (38, 38, runs, 3)
    coef = np.linalg.pinv(X) @ L                               # (38, 38, 3): E, A, B
    pred = np.einsum("abrk,abk->abr", X, coef)
    ok = (coef > 0).all(axis=-1) & (pred > 0).all(axis=-1)
    with np.errstate(all="ignore"):
        sse = np.where(ok, np.sum((np.log(np.abs(pred)) - np.log(L)) ** 2, axis=-1), np.inf)
    found = [(alpha.flat[i], beta.flat[i], coef.reshape(-1, 3)[i])
             for i in np.argsort(sse, axis=None)[:3] if np.isfinite(sse.flat[i])]

    def residuals(p):
        E, a, b, alpha, beta = p
        return np.log(E + np.exp(a - alpha * np.log(n)) + np.exp(b - beta * np.log(d))) - np.log(L)

    best = None
    for alpha, beta, (E, A, B) in found:
        start = [min(E, 0.999 * L.min()), math.log(A), math.log(B), alpha, beta]
        result = least_squares(residuals, start, method="trf",
                               bounds=([0, -np.inf, -np.inf, 0, 0], [L.min(), np.inf, np.inf, 5, 5]),
                               xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
        if best is None or result.cost < best.cost:
            best = result
    E, a, b, alpha, beta = best.x
    return {"E": float(E), "A": float(math.exp(a) * sN ** alpha),
            "B": float(math.exp(b) * sD ** beta), "alpha": float(alpha), "beta": float(beta)}


def _as_fit(got) -> tuple[dict | None, str | None]:
    if not isinstance(got, dict):
        return None, f"expected a dict with keys E, A, B, alpha, beta; got {_short(got)}"
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in got]
    if missing:
        return None, f"the dict lacks {missing}; it needs E, A, B, alpha and beta"
    fit = {}
    for k in ("E", "A", "B", "alpha", "beta"):
        value, problem = as_number(got[k], f"a single number for {k!r}")
        if problem:
            return None, f"{k}: {problem}"
        fit[k] = value
    return fit, None


def _compare_surface(N, D, L):
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))

    def compare(got, expected) -> str | None:
        fit, problem = _as_fit(got)
        if problem:
            return problem
        target = _log_rms(expected, N, D, L)
        bar = 1.02 * target + 1e-4
        mine = _log_rms(fit, N, D, L)
        good = mine <= bar
        if good and min(fit["A"], fit["B"], fit["alpha"], fit["beta"]) > 0:
            return None
        if good:
            return (f"the fit matches the losses, but A, B, alpha and beta must all be "
                    f"positive (got {_short(fit)}): both terms fall as N and D grow")
        swapped = {**fit, "A": fit["B"], "B": fit["A"], "alpha": fit["beta"], "beta": fit["alpha"]}
        if _log_rms(swapped, N, D, L) <= bar:
            return ("the N term and the D term are swapped: A and alpha go with N "
                    "(A / N^alpha), B and beta with D (B / D^beta)")
        logs = {**fit, "A": math.exp(min(fit["A"], 700)), "B": math.exp(min(fit["B"], 700))}
        if _log_rms(logs, N, D, L) <= bar:
            return "A and B look like log A and log B: exponentiate them before returning"
        if mine > 0.1:
            return (f"the fit is far from the losses: root-mean-square error of log L is "
                    f"{mine:.3g} (about {mine:.0%} of the loss), the reference fit reaches "
                    f"{target:.3g}. Check the formula, E + A / N^alpha + B / D^beta, and that "
                    f"you return the constants your optimiser found")
        with np.errstate(all="ignore"):
            mine_pred, ref_pred = _surface_predict(fit, N, D), _surface_predict(expected, N, D)
        worst = int(np.nanargmax(np.abs(np.log(np.abs(mine_pred) + 1e-300) - np.log(ref_pred))))
        return (f"the fit is worse than it could be: root-mean-square error of log L is "
                f"{mine:.4g}, the reference fit reaches {target:.4g}.\n"
                f"  Worst run: N = {N[worst]:.4g}, D = {D[worst]:.4g}, loss {L[worst]:.4g}; your "
                f"fit predicts {mine_pred[worst]:.4g}, the reference {ref_pred[worst]:.4g}.\n"
                f"  The fit is ill-conditioned: an optimiser started from one point often stops "
                f"early. Fit log A and log B, rescale N and D, and try several starting "
                f"exponents, keeping the best")
    return compare


def check_loss_surface(fn) -> None:
    """Grade ``fn(N, D, loss) -> {"E", "A", "B", "alpha", "beta"}``: Chinchilla's
    ``L(N, D) = E + A / N**alpha + B / D**beta`` fitted by least squares on ``log L``. The
    constants are poorly determined, so the fit is judged by its error on the runs: no worse than
    an independent reference fit (2% slack). ``N``, ``D`` and ``loss`` are 1-D float64 arrays."""
    __tracebackhide__ = True
    cases = []
    for k, ((N, D, L), desc) in enumerate(_surface_inputs(), 1):
        cases.append(Case(desc, args=(N, D, L), expected=_surface_reference(N, D, L),
                          compare=_compare_surface(N, D, L),
                          rebuild=_rebuild("loss_surface", k, "N, D, loss", (N, D, L)),
                          hint="minimise sum((log L_fit - log L)^2) over E, log A, log B, alpha "
                               "and beta (scipy.optimize.least_squares), from several starting "
                               "exponents"))
    run_cases("check_loss_surface", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: the best N and D for a budget, from a fitted L(N, D)


def _optimal_inputs():
    lopsided = {"E": 0.5, "A": 3.0, "B": 80.0, "alpha": 0.5, "beta": 0.2}
    return [
        ((5.76e23, dict(CHINCHILLA_2022)), "Gopher's budget with Chinchilla's published fit"),
        ((1e20, dict(BESIROGLU_2024)), "1e20 FLOPs with Besiroglu et al.'s refit"),
        ((1e12, lopsided), "1e12 FLOPs with an invented fit whose exponents differ a lot"),
        ((3.14e23, dict(BESIROGLU_2024)), "GPT-3's budget with the refit"),
    ]


def _optimal(C, fit):
    a, b = fit["alpha"], fit["beta"]
    G = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    return N, C / (6 * N)


def _compare_optimal(C, fit):
    def close(x, y):
        return math.isclose(x, y, rel_tol=1e-4)

    def compare(got, expected) -> str | None:
        pair, problem = _pair(got, ("N", "D"))
        if problem:
            return problem
        N, D = pair
        eN, eD = expected
        if close(N, eN) and close(D, eD):
            return None
        if close(N, eD) and close(D, eN):
            return ("N and D are swapped (or, the same thing, alpha/A with beta/B): A / N^alpha "
                    "is the parameter term, B / D^beta the data term; return (N, D)")
        a, b = fit["alpha"], fit["beta"]
        wrong_c = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b)) * C ** (b / (a + b))
        if close(N, wrong_c):
            return "N uses C where C / 6 belongs: along the budget, N D = C / 6"
        if not close(6 * N * D, C):
            return f"6 N D = {6 * N * D:.4g} does not equal the budget C = {C:.4g}"
        return f"expected N = {eN:.6g}, D = {eD:.6g}; got N = {N:.6g}, D = {D:.6g}"
    return compare


def check_optimal_size(fn) -> None:
    """Grade ``fn(C, fit) -> (N, D)``: the ``N`` and ``D = C / (6 N)`` that minimise
    ``E + A / N**alpha + B / D**beta``; ``fit`` is a dict with E, A, B, alpha and beta."""
    __tracebackhide__ = True
    cases = [Case(desc, args=(C, fit), expected=_optimal(C, fit), compare=_compare_optimal(C, fit),
                  hint="put D = C / (6 N) into the loss, set its derivative in N to zero (or "
                       "minimise numerically over log N), then D = C / (6 N)")
             for (C, fit), desc in _optimal_inputs()]
    run_cases("check_optimal_size", fn, cases)


# -----------------------------------------------------------------------------
# rebuilding a case by hand

_INPUTS = {"loglog_fit": _loglog_inputs, "compute_frontier": _frontier_inputs,
           "loss_surface": _surface_inputs, "optimal_size": _optimal_inputs}


def exercise_inputs(name: str, k: int):
    """The arguments of case ``k`` (from 1) of ``check_<name>``, as the checker passes them:
    ``exercise_inputs("loss_surface", 3)`` gives ``(N, D, loss)`` of the third case."""
    if name not in _INPUTS:
        raise ValueError(f"name must be one of {sorted(_INPUTS)}, got {name!r}")
    cases = _INPUTS[name]()
    if not is_int(k) or not 1 <= k <= len(cases):
        raise ValueError(f"k must be an int from 1 to {len(cases)}, got {k!r}")
    args, _ = cases[k - 1]
    return tuple(a.clone() if isinstance(a, torch.Tensor) else
                 a.copy() if isinstance(a, (np.ndarray, dict, list)) else a for a in args)
