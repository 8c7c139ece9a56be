"""Chapter 6's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch06 import (check_count_gpt_parameters, check_moe_parameters, check_tie_head,
                                        check_training_memory, moe_reference)
from lessons_lib.model import GPT, GPTConfig, count_parameters

# -----------------------------------------------------------------------------
# counting parameters


def count_right(n_layer, n_embd, vocab_size, block_size):
    d = n_embd
    per_layer = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab_size * d + block_size * d + n_layer * per_layer + 2 * d


def test_count_accepts_the_formula(capsys):
    check_count_gpt_parameters(count_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_count_agrees_with_a_model_built_on_the_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=3, n_embd=48, vocab_size=70, block_size=20, n_head=4))
    assert count_right(3, 48, 70, 20) == sum(p.numel() for p in model.parameters())


def test_count_rejects_a_head_counted_twice_and_says_so():
    with pytest.raises(CheckFailed, match="head is tied"):
        check_count_gpt_parameters(lambda L, d, V, T: count_right(L, d, V, T) + V * d)


def test_count_rejects_the_12_L_d_squared_approximation():
    with pytest.raises(CheckFailed, match="expected"):
        check_count_gpt_parameters(lambda L, d, V, T: 12 * L * d * d + (V + T) * d)


def test_count_names_missing_positions_and_missing_biases():
    with pytest.raises(CheckFailed, match="position embeddings"):
        check_count_gpt_parameters(lambda L, d, V, T: count_right(L, d, V, T) - T * d)
    with pytest.raises(CheckFailed, match="bias"):
        check_count_gpt_parameters(lambda L, d, V, T: count_right(L, d, V, T) - 13 * L * d)


def test_count_rejects_a_float_that_is_not_whole():
    with pytest.raises(CheckFailed, match="whole number"):
        check_count_gpt_parameters(lambda L, d, V, T: count_right(L, d, V, T) + 0.5)


# -----------------------------------------------------------------------------
# memory for training


def memory_right(n_params, precision):
    per_param = {"fp32": 4 + 4 + 4 + 4, "mixed": 2 + 2 + 4 + 4 + 4, "bf16": 2 + 2 + 2 + 2}[precision]
    return n_params * per_param


def test_memory_accepts_the_accounting(capsys):
    check_training_memory(memory_right)
    assert "all 7 checks passed" in capsys.readouterr().out


def test_memory_rejects_forgetting_adam_states():
    with pytest.raises(CheckFailed, match="Adam"):
        check_training_memory(lambda n, p: n * {"fp32": 8, "mixed": 4, "bf16": 4}[p])


def test_memory_rejects_mixed_precision_without_the_master_copy():
    def no_master(n, p):
        return n * {"fp32": 16, "mixed": 12, "bf16": 8}[p]
    with pytest.raises(CheckFailed, match="master copy"):
        check_training_memory(no_master)


# -----------------------------------------------------------------------------
# mixture of experts


def moe_right(n_layer, n_embd, vocab_size, block_size, n_experts, top_k):
    dense = count_right(n_layer, n_embd, vocab_size, block_size)
    mlp = 8 * n_embd * n_embd + 5 * n_embd
    router = n_embd * n_experts
    total = dense + n_layer * ((n_experts - 1) * mlp + router)
    active = dense + n_layer * ((top_k - 1) * mlp + router)
    return total, active


def test_moe_accepts_a_correct_count(capsys):
    check_moe_parameters(moe_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_moe_reference_with_one_expert_is_the_dense_model_plus_routers():
    total, active = moe_reference(2, 16, 10, 8, 1, 1)
    assert total == active == count_parameters(GPTConfig(n_layer=2, n_embd=16, vocab_size=10, block_size=8,
                                                         n_head=1)) + 2 * 16


def test_moe_rejects_swapped_order_and_missing_routers():
    with pytest.raises(CheckFailed, match="wrong way round"):
        check_moe_parameters(lambda *a: moe_right(*a)[::-1])

    def no_router(L, d, V, T, E, k):
        total, active = moe_right(L, d, V, T, E, k)
        return total - L * d * E, active - L * d * E
    with pytest.raises(CheckFailed, match="routers"):
        check_moe_parameters(no_router)


def test_moe_rejects_counting_only_the_experts_as_active():
    def experts_only(L, d, V, T, E, k):
        total, _ = moe_right(L, d, V, T, E, k)
        return total, L * k * (8 * d * d + 5 * d)
    with pytest.raises(CheckFailed, match="active"):
        check_moe_parameters(experts_only)


# -----------------------------------------------------------------------------
# tying the head


def tie_right(model):
    model.lm_head.weight = model.wte.weight


def test_tie_accepts_sharing_the_parameter(capsys):
    check_tie_head(tie_right)
    assert "all 2 checks passed" in capsys.readouterr().out


def test_tie_rejects_a_copy():
    def copy(model):
        with torch.no_grad():
            model.lm_head.weight.copy_(model.wte.weight)
    with pytest.raises(CheckFailed, match="copy"):
        check_tie_head(copy)


def test_tie_rejects_tying_the_wrong_way_round():
    def backwards(model):
        model.wte.weight = model.lm_head.weight
    with pytest.raises(CheckFailed, match="embedding changed"):
        check_tie_head(backwards)


def test_tie_reports_a_crash_and_a_non_function():
    def crash(model):
        raise RuntimeError("boom")
    with pytest.raises(CheckFailed, match="raised RuntimeError: boom"):
        check_tie_head(crash)
    with pytest.raises(CheckFailed, match="without calling it"):
        check_tie_head(None)
