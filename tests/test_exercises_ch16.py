"""Chapter 16's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch16 import (check_data_parallel_gradient, check_tensor_parallel_mlp,
                                        check_zero_memory)

# -----------------------------------------------------------------------------
# ZeRO memory


def zero_right(n_params, n_gpus, stage):
    weights, grads, adam = 2 * n_params, 2 * n_params, 12 * n_params
    if stage >= 1:
        adam /= n_gpus
    if stage >= 2:
        grads /= n_gpus
    if stage >= 3:
        weights /= n_gpus
    return weights + grads + adam


def test_zero_memory_accepts_a_correct_answer(capsys):
    check_zero_memory(zero_right)
    assert "all 7 checks passed" in capsys.readouterr().out


def test_zero_memory_accepts_an_int():
    check_zero_memory(lambda p, n, s: round(zero_right(p, n, s)))


def test_zero_memory_rejects_no_sharding():
    with pytest.raises(CheckFailed, match="plain data parallelism"):
        check_zero_memory(lambda p, n, s: 16 * p)


def test_zero_memory_rejects_sharding_everything():
    with pytest.raises(CheckFailed, match="stage 3"):
        check_zero_memory(lambda p, n, s: 16 * p / n)


def test_zero_memory_rejects_adam_without_master_weights():
    def eight_bytes(p, n, s):
        return zero_right(p, n, s) - 4 * p / (n if s >= 1 else 1)
    with pytest.raises(CheckFailed, match="master copy"):
        check_zero_memory(eight_bytes)


def test_zero_memory_rejects_gigabytes():
    with pytest.raises(CheckFailed, match="gigabytes"):
        check_zero_memory(lambda p, n, s: zero_right(p, n, s) / 1e9)


def test_zero_memory_rejects_stage_two_as_stage_one():
    def off_by_one(p, n, s):
        return zero_right(p, n, max(0, s - 1))
    with pytest.raises(CheckFailed, match="stage 1"):
        check_zero_memory(off_by_one)


def test_zero_memory_keeps_the_learners_traceback():
    def broken(p, n, s):
        return {0: 16}[s] * p
    with pytest.raises(CheckFailed, match="raised KeyError") as info:
        check_zero_memory(broken)
    assert isinstance(info.value.__cause__, KeyError)


# -----------------------------------------------------------------------------
# the data-parallel gradient


def part_gradient(w, x, y):
    w = w.clone().requires_grad_(True)
    ((x @ w - y) ** 2).mean().backward()
    return w.grad


def dp_right(w, xs, ys):
    rows = [len(y) for y in ys]
    grads = [part_gradient(w, x, y) for x, y in zip(xs, ys)]
    return sum(n * g for n, g in zip(rows, grads)) / sum(rows)


def test_data_parallel_gradient_accepts_a_correct_answer(capsys):
    check_data_parallel_gradient(dp_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_data_parallel_gradient_accepts_the_combined_batch_directly():
    check_data_parallel_gradient(lambda w, xs, ys: part_gradient(w, torch.cat(xs), torch.cat(ys)))


def test_data_parallel_gradient_rejects_a_plain_mean_of_unequal_parts():
    def plain(w, xs, ys):
        grads = [part_gradient(w, x, y) for x, y in zip(xs, ys)]
        return sum(grads) / len(grads)
    with pytest.raises(CheckFailed, match="weight each part by its rows"):
        check_data_parallel_gradient(plain)


def test_data_parallel_gradient_rejects_a_sum():
    with pytest.raises(CheckFailed, match="sum of the parts"):
        check_data_parallel_gradient(lambda w, xs, ys: sum(part_gradient(w, x, y) for x, y in zip(xs, ys)))


def test_data_parallel_gradient_keeps_the_learners_traceback():
    def broken(w, xs, ys):
        return part_gradient(w, xs, ys)
    with pytest.raises(CheckFailed, match="raised") as info:
        check_data_parallel_gradient(broken)
    assert info.value.__cause__ is not None


# -----------------------------------------------------------------------------
# the tensor-parallel MLP


def mlp_right(x, w_fc, b_fc, w_proj, n_shards):
    h = w_fc.shape[0] // n_shards
    return [F.gelu(x @ w_fc[i * h:(i + 1) * h].T + b_fc[i * h:(i + 1) * h], approximate="tanh")
            @ w_proj[:, i * h:(i + 1) * h].T for i in range(n_shards)]


def test_tensor_parallel_mlp_accepts_a_correct_answer(capsys):
    check_tensor_parallel_mlp(mlp_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_tensor_parallel_mlp_agrees_with_the_library_mlp():
    from lessons_lib.model import MLP
    torch.manual_seed(0)
    mlp = MLP(8).eval()
    x = torch.randn(5, 8)
    parts = mlp_right(x, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, 4)
    torch.testing.assert_close(sum(parts) + mlp.c_proj.bias, mlp(x), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_mlp_rejects_the_unsharded_output_once():
    def whole(x, w_fc, b_fc, w_proj, n_shards):
        return [F.gelu(x @ w_fc.T + b_fc, approximate="tanh") @ w_proj.T] * n_shards
    with pytest.raises(CheckFailed, match="do not add up"):
        check_tensor_parallel_mlp(whole)


def test_tensor_parallel_mlp_rejects_a_split_of_the_output_features():
    def wrong_axis(x, w_fc, b_fc, w_proj, n_shards):
        full = F.gelu(x @ w_fc.T + b_fc, approximate="tanh") @ w_proj.T
        return list(full.chunk(n_shards, dim=-1))
    with pytest.raises(CheckFailed, match="not yet"):
        check_tensor_parallel_mlp(wrong_axis)


def test_tensor_parallel_mlp_rejects_exact_gelu():
    def exact(x, w_fc, b_fc, w_proj, n_shards):
        h = w_fc.shape[0] // n_shards
        return [F.gelu(x @ w_fc[i * h:(i + 1) * h].T + b_fc[i * h:(i + 1) * h])
                @ w_proj[:, i * h:(i + 1) * h].T for i in range(n_shards)]
    with pytest.raises(CheckFailed, match="not yet"):
        check_tensor_parallel_mlp(exact)


def test_tensor_parallel_mlp_rejects_a_tensor_instead_of_a_list():
    with pytest.raises(CheckFailed, match="list of"):
        check_tensor_parallel_mlp(lambda *a: sum(mlp_right(*a)))


def test_tensor_parallel_mlp_keeps_the_learners_traceback():
    def broken(x, w_fc, b_fc, w_proj, n_shards):
        return [x @ w_fc]
    with pytest.raises(CheckFailed, match="raised RuntimeError") as info:
        check_tensor_parallel_mlp(broken)
    assert isinstance(info.value.__cause__, RuntimeError)
