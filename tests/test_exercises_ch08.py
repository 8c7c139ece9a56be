"""Chapter 8's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize_scalar

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch08 import (_surface_reference, check_compute_frontier, check_loglog_fit,
                                        check_loss_surface, check_optimal_size, exercise_inputs)
from lessons_lib.scaling import CHINCHILLA_2022, compute_optimal, fit_loss_surface

# -----------------------------------------------------------------------------
# a line in log-log axes


def loglog_right(x, loss):
    u, v = torch.log(x), torch.log(loss)
    slope = ((u - u.mean()) * (v - v.mean())).sum() / ((u - u.mean()) ** 2).sum()
    return -slope.item(), math.exp((v.mean() - slope * u.mean()).item())


def test_loglog_accepts_a_correct_answer(capsys):
    check_loglog_fit(loglog_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_loglog_accepts_numpy_polyfit_in_log10():
    def polyfit10(x, loss):
        slope, intercept = np.polyfit(np.log10(x.numpy()), np.log10(loss.numpy()), 1)
        return -slope, 10 ** intercept
    check_loglog_fit(polyfit10)


def test_loglog_rejects_a_flipped_sign():
    with pytest.raises(CheckFailed, match="sign is flipped"):
        check_loglog_fit(lambda x, y: (-loglog_right(x, y)[0], loglog_right(x, y)[1]))


def test_loglog_rejects_the_log_of_a():
    with pytest.raises(CheckFailed, match="log A"):
        check_loglog_fit(lambda x, y: (loglog_right(x, y)[0], math.log(loglog_right(x, y)[1])))


def test_loglog_rejects_a_fit_in_linear_space():
    def linear(x, loss):
        slope, intercept = np.polyfit(x.numpy(), loss.numpy(), 1)
        return -slope, intercept
    with pytest.raises(CheckFailed, match="straight line only after taking the log"):
        check_loglog_fit(linear)


def test_loglog_rejects_a_single_number():
    with pytest.raises(CheckFailed, match="pair"):
        check_loglog_fit(lambda x, y: loglog_right(x, y)[0])


# -----------------------------------------------------------------------------
# the compute-efficient frontier


def frontier_right(C, loss):
    best, on = math.inf, []
    for i in sorted(range(len(C)), key=lambda i: C[i]):
        if loss[i] < best:
            on.append(i)
            best = loss[i]
    return on


def test_frontier_accepts_a_correct_answer(capsys):
    check_compute_frontier(frontier_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_frontier_accepts_numpy_and_tensor_results():
    check_compute_frontier(lambda C, loss: np.array(frontier_right(C, loss)))
    check_compute_frontier(lambda C, loss: torch.tensor(frontier_right(C, loss)))


def test_frontier_rejects_a_scan_in_the_given_order():
    def unsorted(C, loss):
        best, on = math.inf, []
        for i in range(len(C)):
            if loss[i] < best:
                on.append(i)
                best = loss[i]
        return on
    with pytest.raises(CheckFailed, match="sort by compute first"):
        check_compute_frontier(unsorted)


def test_frontier_rejects_positions_in_the_sorted_order():
    def positions(C, loss):
        order = sorted(range(len(C)), key=lambda i: C[i])
        return [order.index(i) for i in frontier_right(C, loss)]
    with pytest.raises(CheckFailed, match="positions in the runs sorted"):
        check_compute_frontier(positions)


def test_frontier_rejects_a_comparison_with_the_previous_run_only():
    def previous(C, loss):
        order = sorted(range(len(C)), key=lambda i: C[i])
        return [i for k, i in enumerate(order) if k == 0 or loss[i] < loss[order[k - 1]]]
    with pytest.raises(CheckFailed, match="best so far"):
        check_compute_frontier(previous)


def test_frontier_rejects_a_mask():
    def mask(C, loss):
        m = np.zeros(len(C), dtype=bool)
        m[frontier_right(C, loss)] = True
        return m
    with pytest.raises(CheckFailed, match="boolean mask"):
        check_compute_frontier(mask)


def test_frontier_rejects_the_wrong_order():
    with pytest.raises(CheckFailed, match="wrong order"):
        check_compute_frontier(lambda C, loss: frontier_right(C, loss)[::-1])


def test_frontier_names_a_run_that_is_beaten():
    with pytest.raises(CheckFailed, match="is not on the frontier") as info:
        check_compute_frontier(lambda C, loss: sorted(range(len(C)), key=lambda i: C[i]))
    assert "Inputs: ([1000000000.0" in str(info.value)          # small inputs are printed


def test_frontier_keeps_the_learners_traceback():
    def broken(C, loss):
        return C.argsort()            # lists have no argsort
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_compute_frontier(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# the loss surface L(N, D)


def surface_right(N, D, loss):
    logN, logD, logL = np.log(N), np.log(D), np.log(loss)

    def residuals(p):
        E, a, b, alpha, beta = p
        return np.log(E + np.exp(a - alpha * logN) + np.exp(b - beta * logD)) - logL

    bounds = ([0, -np.inf, -np.inf, 0, 0], [loss.min(), np.inf, np.inf, 5, 5])
    best = None
    for alpha in (0.1, 0.3, 0.6):
        for beta in (0.1, 0.3, 0.6):
            start = [loss.min() / 2, alpha * logN.mean(), beta * logD.mean(), alpha, beta]
            result = least_squares(residuals, start, bounds=bounds)
            if best is None or result.cost < best.cost:
                best = result
    E, a, b, alpha, beta = best.x
    return {"E": E, "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}


def test_surface_accepts_a_correct_answer(capsys):
    check_loss_surface(surface_right)
    assert "all 3 checks passed" in capsys.readouterr().out


@pytest.mark.slow
def test_surface_accepts_the_librarys_fit():
    check_loss_surface(fit_loss_surface)


def test_surface_reference_recovers_the_published_constants():
    N, D, loss = exercise_inputs("loss_surface", 1)
    fit = _surface_reference(N, D, loss)
    for key, value in CHINCHILLA_2022.items():
        assert math.isclose(fit[key], value, rel_tol=1e-6)


def test_surface_rejects_a_single_start():
    def one_start(N, D, loss):
        def residuals(p):
            E, A, B, alpha, beta = p
            return np.log(E + A * N ** -alpha + B * D ** -beta) - np.log(loss)
        E, A, B, alpha, beta = least_squares(residuals, [1.0, 1.0, 1.0, 0.5, 0.5]).x
        return {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta}
    with pytest.raises(CheckFailed, match="worse than it could be") as info:
        check_loss_surface(one_start)
    assert "exercise_inputs('loss_surface', 2)" in str(info.value)


def test_surface_rejects_swapped_terms():
    def swapped(N, D, loss):
        f = surface_right(N, D, loss)
        return {"E": f["E"], "A": f["B"], "B": f["A"], "alpha": f["beta"], "beta": f["alpha"]}
    with pytest.raises(CheckFailed, match="swapped"):
        check_loss_surface(swapped)


def test_surface_rejects_log_a():
    def logs(N, D, loss):
        f = surface_right(N, D, loss)
        return {**f, "A": math.log(f["A"]), "B": math.log(f["B"])}
    with pytest.raises(CheckFailed, match="log A"):
        check_loss_surface(logs)


def test_surface_rejects_a_fit_without_the_data_term():
    def size_only(N, D, loss):
        fit = fit_loss_surface(N, D, loss)
        return {**fit, "B": 1e-12}
    with pytest.raises(CheckFailed, match="far from the losses"):
        check_loss_surface(size_only)


def test_surface_rejects_missing_keys():
    with pytest.raises(CheckFailed, match="lacks"):
        check_loss_surface(lambda N, D, loss: {"E": 1.0, "A": 1.0, "alpha": 0.3})


def test_exercise_inputs_rebuilds_the_cases():
    x, loss = exercise_inputs("loglog_fit", 3)
    again, _ = exercise_inputs("loglog_fit", 3)
    assert torch.equal(x, again) and x.dtype == torch.float64
    with pytest.raises(ValueError, match="from 1 to 3"):
        exercise_inputs("loss_surface", 4)
    with pytest.raises(ValueError, match="name must be one of"):
        exercise_inputs("nothing", 1)


# -----------------------------------------------------------------------------
# the best N and D from a fitted L(N, D)


def optimal_closed_form(C, fit):
    a, b = fit["alpha"], fit["beta"]
    G = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    return N, C / (6 * N)


def optimal_numeric(C, fit):
    def loss(log_n):
        N = math.exp(log_n)
        return fit["A"] / N ** fit["alpha"] + fit["B"] / (C / (6 * N)) ** fit["beta"]
    best = minimize_scalar(loss, bracket=(math.log(C) / 4, math.log(C) / 2), tol=1e-12)
    N = math.exp(best.x)
    return N, C / (6 * N)


@pytest.mark.parametrize("answer", [optimal_closed_form, optimal_numeric,
                                    lambda C, fit: (compute_optimal(C, fit)["N"], compute_optimal(C, fit)["D"])])
def test_optimal_accepts_correct_answers(answer, capsys):
    check_optimal_size(answer)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_optimal_rejects_c_instead_of_c_over_6():
    def no_sixth(C, fit):
        a, b = fit["alpha"], fit["beta"]
        N = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b)) * C ** (b / (a + b))
        return N, C / (6 * N)
    with pytest.raises(CheckFailed, match="C / 6"):
        check_optimal_size(no_sixth)


def test_optimal_rejects_swapped_terms():
    def swapped(C, fit):
        return optimal_closed_form(C, {"A": fit["B"], "B": fit["A"], "alpha": fit["beta"], "beta": fit["alpha"]})
    with pytest.raises(CheckFailed, match="swapped"):
        check_optimal_size(swapped)


def test_optimal_rejects_the_20_tokens_rule():
    def rule(C, fit):
        N = math.sqrt(C / 120)
        return N, 20 * N
    with pytest.raises(CheckFailed, match="expected N") as info:
        check_optimal_size(rule)
    assert "Inputs: (" in str(info.value)          # small inputs are printed


def test_optimal_rejects_an_answer_that_overspends():
    with pytest.raises(CheckFailed, match="does not equal the budget"):
        check_optimal_size(lambda C, fit: (optimal_closed_form(C, fit)[0], C / 6))


def test_surface_says_when_a_fit_is_far_off():
    def constant(N, D, loss):
        return {"E": 1.0, "A": 1.0, "B": 1.0, "alpha": 0.3, "beta": 0.3}
    with pytest.raises(CheckFailed, match="far from the losses"):
        check_loss_surface(constant)


def test_surface_keeps_the_learners_traceback():
    def raising(N, D, loss):
        raise ZeroDivisionError("division by zero in my fit")
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError") as info:
        check_loss_surface(raising)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
