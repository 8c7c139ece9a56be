"""Chapter 8's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch08 import (check_chinchilla_rule, check_loglog_fit, check_optimal_size,
                                        check_training_flops)
from lessons_lib.scaling import compute_optimal

# -----------------------------------------------------------------------------
# training FLOPs


def flops_right(n_layer, d_model, tokens):
    return 6 * 12 * n_layer * d_model ** 2 * tokens


def test_flops_accepts_a_correct_answer(capsys):
    check_training_flops(flops_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_flops_accepts_a_tensor_result():
    check_training_flops(lambda L, d, D: torch.tensor(float(flops_right(L, d, D)), dtype=torch.float64))


def test_flops_rejects_the_forward_pass_only():
    with pytest.raises(CheckFailed, match="forward pass only"):
        check_training_flops(lambda L, d, D: 2 * 12 * L * d ** 2 * D)


def test_flops_rejects_d_not_squared():
    with pytest.raises(CheckFailed, match="square d_model"):
        check_training_flops(lambda L, d, D: 6 * 12 * L * d * D)


def test_flops_rejects_a_missing_layer_count():
    with pytest.raises(CheckFailed, match="multiply by n_layer"):
        check_training_flops(lambda L, d, D: 6 * 12 * d ** 2 * D)


def test_flops_rejects_attention_without_the_mlp():
    with pytest.raises(CheckFailed, match="without the MLP"):
        check_training_flops(lambda L, d, D: 6 * 4 * L * d ** 2 * D)


def test_flops_reports_a_stub():
    def stub(L, d, D):
        raise NotImplementedError
    with pytest.raises(CheckFailed, match="raised NotImplementedError"):
        check_training_flops(stub)


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
# Chinchilla's rule of thumb


def rule_right(C, tokens_per_param=20):
    N = math.sqrt(C / (6 * tokens_per_param))
    return N, tokens_per_param * N


def test_rule_accepts_a_correct_answer(capsys):
    check_chinchilla_rule(rule_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_rule_gives_chinchilla_about_70b_on_1_4t():
    N, D = rule_right(5.88e23)
    assert 69e9 < N < 71e9 and 1.38e12 < D < 1.42e12


def test_rule_rejects_a_missing_square_root():
    with pytest.raises(CheckFailed, match="square root"):
        check_chinchilla_rule(lambda C, tokens_per_param=20: (C / (6 * tokens_per_param),
                                                              C / 6 / (C / (6 * tokens_per_param))))


def test_rule_rejects_a_forgotten_six():
    def no_six(C, tokens_per_param=20):
        N = math.sqrt(C / tokens_per_param)
        return N, tokens_per_param * N
    with pytest.raises(CheckFailed, match="forgot the 6"):
        check_chinchilla_rule(no_six)


def test_rule_rejects_swapped_outputs():
    with pytest.raises(CheckFailed, match="swapped"):
        check_chinchilla_rule(lambda C, tokens_per_param=20: rule_right(C, tokens_per_param)[::-1])


def test_rule_rejects_a_hard_coded_ratio():
    with pytest.raises(CheckFailed, match="expected N"):
        check_chinchilla_rule(lambda C, tokens_per_param=20: rule_right(C, 20))


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
    with pytest.raises(CheckFailed, match="expected N"):
        check_optimal_size(lambda C, fit: rule_right(C))


def test_optimal_rejects_an_answer_that_overspends():
    with pytest.raises(CheckFailed, match="does not equal the budget"):
        check_optimal_size(lambda C, fit: (optimal_closed_form(C, fit)[0], C / 6))
