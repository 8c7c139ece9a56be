"""Chapter 6's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch06 import (block_case, check_block_forward, check_forward_flops,
                                        check_tie_head, check_training_memory)

# -----------------------------------------------------------------------------
# a Block's forward pass


def block_right(block, x, *, causal=True, gelu="tanh", pre_norm=True, scale=True):
    B, T, d = x.shape
    h = block.attn.n_heads

    def attention(t):
        q, k, v = block.attn.c_attn(t).split(d, dim=-1)
        q, k, v = (z.view(B, T, h, d // h).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / (math.sqrt(d // h) if scale else 1.0)
        if causal:
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        return block.attn.c_proj(y)

    def mlp(t):
        return block.mlp.c_proj(F.gelu(block.mlp.c_fc(t), approximate=gelu))

    if not pre_norm:
        x = block.ln_1(x + attention(x))
        return block.ln_2(x + mlp(x))
    x = x + attention(block.ln_1(x))
    return x + mlp(block.ln_2(x))


def test_block_accepts_a_forward_pass_from_the_submodules(capsys):
    check_block_forward(block_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_block_accepts_pytorchs_fused_attention():
    def fused(block, x):
        B, T, d = x.shape
        h = block.attn.n_heads
        q, k, v = (z.view(B, T, h, d // h).transpose(1, 2) for z in block.attn.c_attn(block.ln_1(x)).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + block.attn.c_proj(y)
        return x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
    check_block_forward(fused)


def test_block_case_is_the_libraries_block_with_the_same_output():
    block, x = block_case(2)
    with torch.no_grad():
        assert torch.allclose(block(x), block_right(block, x), atol=1e-5)
    with pytest.raises(ValueError, match="seed"):
        block_case(0)


@pytest.mark.parametrize("mistake, message", [
    (dict(causal=False), "causal mask"),
    (dict(gelu="none"), "tanh"),
    (dict(pre_norm=False), "post-LN"),
    (dict(scale=False), "sqrt"),
])
def test_block_names_the_typical_mistakes(mistake, message):
    with pytest.raises(CheckFailed, match=message) as info:
        check_block_forward(lambda block, x: block_right(block, x, **mistake))
    assert "To rerun this case: from lessons_lib.exercises.ch06 import block_case" in str(info.value)


def test_block_rejects_calling_the_block_or_its_attention():
    with pytest.raises(CheckFailed, match="called block itself"):
        check_block_forward(lambda block, x: block(x))

    def uses_attn(block, x):
        x = x + block.attn(block.ln_1(x))
        return x + block.mlp(block.ln_2(x))
    with pytest.raises(CheckFailed, match="called block.attn"):
        check_block_forward(uses_attn)


def test_block_keeps_the_learners_traceback():
    def crash(block, x):
        raise RuntimeError("boom")
    with pytest.raises(CheckFailed, match="raised RuntimeError: boom") as info:
        check_block_forward(crash)
    assert isinstance(info.value.__cause__, RuntimeError)


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
# forward FLOPs


def flops_right(n_layer, n_embd, vocab_size, T):
    d = n_embd
    return n_layer * (24 * T * d * d + 4 * T * T * d) + 2 * T * d * vocab_size


def test_flops_accepts_the_formula(capsys):
    check_forward_flops(flops_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_flops_agree_with_pytorchs_counter_on_the_weight_products():
    # FlopCounterMode counts the Linear layers; whether it counts the fused attention kernel
    # depends on the kernel PyTorch picks (on a CPU today it does not)
    from torch.utils.flop_counter import FlopCounterMode

    from lessons_lib.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16))
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 16, dtype=torch.long))
    full = flops_right(2, 16, 30, 16)
    attention_core = 2 * 4 * 16 * 16 * 16          # q k^T and weights @ v, 2 layers
    assert counter.get_total_flops() in (full, full - attention_core)


@pytest.mark.parametrize("wrong, message", [
    (lambda L, d, V, T: flops_right(L, d, V, T) // 2, "2 FLOPs"),
    (lambda L, d, V, T: flops_right(L, d, V, T) - 2 * T * d * V, "head is missing"),
    (lambda L, d, V, T: L * 24 * T * d * d + 2 * T * d * V, "attention products"),
    (lambda L, d, V, T: flops_right(L, d, V, T) - 2 * L * T * T * d, "halved"),
    (lambda L, d, V, T: float(flops_right(L, d, V, T)) + 0.5, "whole number"),
])
def test_flops_names_the_typical_mistakes(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_forward_flops(wrong)


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
    with pytest.raises(CheckFailed, match="copy") as info:
        check_tie_head(copy)
    assert "To rerun this case: model = GPT(GPTConfig(vocab_size=11" in str(info.value)


def test_tie_rejects_tying_the_wrong_way_round():
    def backwards(model):
        model.wte.weight = model.lm_head.weight
    with pytest.raises(CheckFailed, match="embedding changed"):
        check_tie_head(backwards)


def test_tie_keeps_the_traceback_of_a_crash_and_rejects_a_non_function():
    def crash(model):
        raise RuntimeError("boom")
    with pytest.raises(CheckFailed, match="raised RuntimeError: boom") as info:
        check_tie_head(crash)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(CheckFailed, match="without calling it"):
        check_tie_head(None)
