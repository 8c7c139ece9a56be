"""Chapter 05's checkers accept correct solutions and reject plausible wrong answers."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch05 import (_layer_norm_cases, _lstm_step_cases, check_block_param_count,
                                        check_layer_norm, check_lstm_step, check_sinusoidal_positions)
from lessons_lib.model import Block, sinusoidal_positions


# ----------------------------------------------------------------------------- sinusoidal positions

def sinusoidal(T, d):
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sinusoidal_blocks(T, d):                       # all sines, then all cosines
    pe = sinusoidal(T, d)
    return torch.cat([pe[:, 0::2], pe[:, 1::2]], dim=1)


def sinusoidal_swapped(T, d):
    pe = sinusoidal(T, d)
    return torch.stack([pe[:, 1::2], pe[:, 0::2]], dim=-1).reshape(T, d)


def sinusoidal_i_over_d(T, d):                     # 10000^(i/d) with i the pair index
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    angle = pos / 10000.0 ** (torch.arange(d // 2) / d)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(T, d)


def test_sinusoidal_accepts_solutions(capsys):
    check_sinusoidal_positions(sinusoidal)
    check_sinusoidal_positions(sinusoidal_positions)          # the library's version, independently written
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


@pytest.mark.parametrize("wrong, words", [
    (sinusoidal_blocks, "even"),
    (sinusoidal_swapped, "swapped"),
    (sinusoidal_i_over_d, "PAIRS"),
    (lambda T, d: sinusoidal(T, d).T.contiguous() if T != d else sinusoidal(T, d) + 1, "shape"),
    (lambda T, d: sinusoidal(T, d).tolist(), "torch.Tensor"),
    (lambda T, d: sinusoidal(T, d).long(), "floating-point"),
])
def test_sinusoidal_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_sinusoidal_positions(wrong)


# ----------------------------------------------------------------------------- layer norm

def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def test_layer_norm_accepts_solutions(capsys):
    check_layer_norm(layer_norm)
    check_layer_norm(lambda x, w, b, eps=1e-5: F.layer_norm(x, x.shape[-1:], w, b, eps))   # PyTorch's
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


def ln_unbiased(x, weight, bias, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps) * weight + bias


def ln_eps_outside(x, weight, bias, eps=1e-5):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + eps) * weight + bias


def ln_no_affine(x, weight, bias, eps=1e-5):
    return layer_norm(x, torch.ones_like(weight), torch.zeros_like(bias), eps)


def ln_ignores_eps(x, weight, bias, eps=1e-5):
    return layer_norm(x, weight, bias, 1e-5)


@pytest.mark.parametrize("wrong, words", [
    (ln_unbiased, "unbiased"),
    (ln_eps_outside, "inside the square root"),
    (ln_no_affine, "forgot to multiply by weight"),
    (ln_ignores_eps, "differ"),
    (lambda x, w, b, eps=1e-5: x, "differ"),
])
def test_layer_norm_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_layer_norm(wrong)


def test_layer_norm_explains_a_crash():
    with pytest.raises(CheckFailed, match="raised TypeError"):
        check_layer_norm(lambda x, w, b: x)                   # no eps argument


# ----------------------------------------------------------------------------- block parameters

def block_params(n_embd, bias=True):
    d = n_embd
    if bias:
        return 12 * d * d + 13 * d
    return 12 * d * d + 2 * d


def test_block_param_count_accepts_solutions(capsys):
    check_block_param_count(block_params)
    check_block_param_count(lambda d, bias=True: float(block_params(d, bias)))   # a whole float is fine
    check_block_param_count(lambda d, bias=True: torch.tensor(block_params(d, bias)))
    # counting the real module is a correct answer too
    check_block_param_count(lambda d, bias=True: sum(p.numel() for p in Block(d, 1, bias=bias).parameters()))
    assert capsys.readouterr().out.count("all 5 checks passed") == 4


@pytest.mark.parametrize("wrong, words", [
    (lambda d, bias=True: 12 * d * d + (9 * d if bias else 0), "left out the two LayerNorms"),
    (lambda d, bias=True: block_params(d, bias) - (2 * d if bias else d), "TWO LayerNorms"),
    (lambda d, bias=True: 6 * d * d + (10 * d if bias else 2 * d), "4 \\* n_embd"),
    (lambda d, bias=True: block_params(d, bias) - 2 * d * d, "FOUR"),
    (lambda d, bias=True: 12 * d * d + 13 * d, "counts"),              # ignores bias=False
    (lambda d, bias=True: block_params(d, bias) + 0.5, "whole number"),
    (lambda d, bias=True: str(block_params(d, bias)), "whole number"),
    (lambda d, bias=True: block_params(d, bias) + 1, "expected"),
])
def test_block_param_count_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_block_param_count(wrong)


# ----------------------------------------------------------------------------- one LSTM step

def lstm_step(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    gates = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def torch_lstm_step(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """nn.LSTMCell with the given weights: the reference nobody here wrote."""
    cell = nn.LSTMCell(x.shape[1], h.shape[1])
    with torch.no_grad():
        cell.weight_ih.copy_(weight_ih)
        cell.weight_hh.copy_(weight_hh)
        cell.bias_ih.copy_(bias_ih)
        cell.bias_hh.copy_(bias_hh)
        return cell(x, (h, c))


def test_lstm_step_accepts_solutions(capsys):
    check_lstm_step(lstm_step)
    check_lstm_step(torch_lstm_step)
    assert capsys.readouterr().out.count("all 3 checks passed") == 2


def lstm_step_ifog(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    gates = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh
    i, f, o, g = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def lstm_step_no_tanh(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    gates = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * c_new, c_new


def lstm_step_no_forget(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    gates = x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


@pytest.mark.parametrize("wrong, words", [
    (lstm_step_ifog, "input, forget, cell"),
    (lstm_step_no_tanh, "o \\* tanh"),
    (lambda *a: lstm_step(*a)[::-1], "swapped"),
    (lambda *a: lstm_step(*a)[0], "pair"),
    (lstm_step_no_forget, "c_new: the values differ"),
])
def test_lstm_step_rejects_wrong(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        check_lstm_step(wrong)


def test_checkers_reject_a_non_function():
    for check in (check_sinusoidal_positions, check_layer_norm, check_block_param_count, check_lstm_step):
        with pytest.raises(CheckFailed, match="without calling it"):
            check(42)


# ----------------------------------------------------------------------------- the checker policy

@pytest.mark.parametrize("check, args", [
    (check_sinusoidal_positions, 2), (check_layer_norm, 4), (check_block_param_count, 2),
    (check_lstm_step, 7)])
def test_a_raising_function_keeps_its_traceback(check, args):
    def broken(*a, **k):
        raise ZeroDivisionError("the learner's own bug")
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError") as info:
        check(broken)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("make_cases", [_layer_norm_cases, _lstm_step_cases])
def test_rebuild_lines_rebuild_the_random_inputs(make_cases):
    for case in make_cases():
        assert case.rebuild, case.description
        names = {}
        exec(case.rebuild, {"torch": torch}, names)
        rebuilt = list(names.values())
        inputs = list(case.args) + list(case.kwargs.values())
        assert len(rebuilt) == len(inputs), case.rebuild
        for got, want in zip(rebuilt, inputs):
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want), case.rebuild
            else:
                assert got == want, case.rebuild


def test_a_failing_random_case_prints_its_rebuild_line():
    with pytest.raises(CheckFailed, match="To rerun this case: x = torch.randn\\(2, 3, 8"):
        check_layer_norm(ln_unbiased)
    with pytest.raises(CheckFailed, match="To rerun this case: x = torch.randn\\(2, 3,"):
        check_lstm_step(lstm_step_no_forget)
