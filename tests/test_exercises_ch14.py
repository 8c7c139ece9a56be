"""Chapter 14's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch14 import (check_kv_cache_bytes, check_repeat_kv, check_rms_norm,
                                        check_swiglu)

# -----------------------------------------------------------------------------
# RMSNorm


def rms_norm_right(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def test_rms_norm_accepts_a_correct_answer(capsys):
    check_rms_norm(rms_norm_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_rms_norm_accepts_the_library_module(capsys):
    from lessons_lib.llama import RMSNorm

    def with_module(x, weight, eps):
        norm = RMSNorm(x.shape[-1], eps)
        with torch.no_grad():
            norm.weight.copy_(weight)
            return norm(x)
    check_rms_norm(with_module)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_rms_norm_rejects_layer_norm():
    def layer_norm(x, weight, eps):
        return F.layer_norm(x, x.shape[-1:], weight, None, eps)
    with pytest.raises(CheckFailed, match="LayerNorm"):
        check_rms_norm(layer_norm)


def test_rms_norm_rejects_eps_outside_the_root():
    def outside(x, weight, eps):
        return x / (x.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps) * weight
    with pytest.raises(CheckFailed, match="inside the square root"):
        check_rms_norm(outside)


def test_rms_norm_rejects_a_forgotten_gain():
    def no_gain(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    with pytest.raises(CheckFailed, match="gain"):
        check_rms_norm(no_gain)


def test_rms_norm_rejects_the_wrong_axis():
    def first_axis(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(dim=0, keepdim=True) + eps) * weight
    with pytest.raises(CheckFailed, match="not yet"):
        check_rms_norm(first_axis)


def test_rms_norm_keeps_the_learners_traceback():
    def broken(x, weight, eps):
        return x.rms()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_rms_norm(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# SwiGLU


def swiglu_right(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def test_swiglu_accepts_a_correct_answer(capsys):
    check_swiglu(swiglu_right)
    assert "all 3 checks passed" in capsys.readouterr().out


def test_swiglu_rejects_swapped_gate_and_up():
    with pytest.raises(CheckFailed, match="activation goes on the gate"):
        check_swiglu(lambda x, g, u, d: swiglu_right(x, u, g, d))


@pytest.mark.parametrize("act,name", [(F.gelu, "GELU"), (F.relu, "ReLU")])
def test_swiglu_rejects_other_activations(act, name):
    def other(x, w_gate, w_up, w_down):
        return (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    with pytest.raises(CheckFailed, match=name):
        check_swiglu(other)


def test_swiglu_rejects_an_ungated_mlp():
    def ungated(x, w_gate, w_up, w_down):
        return F.silu(x @ w_up.T) @ w_down.T
    with pytest.raises(CheckFailed, match="not yet"):
        check_swiglu(ungated)


def test_swiglu_rejects_untransposed_weights():
    def untransposed(x, w_gate, w_up, w_down):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down
    with pytest.raises(CheckFailed, match="raised RuntimeError") as info:
        check_swiglu(untransposed)
    assert isinstance(info.value.__cause__, RuntimeError)


# -----------------------------------------------------------------------------
# repeating key/value heads


def repeat_right(k, n_rep):
    return k.repeat_interleave(n_rep, dim=1)


def test_repeat_kv_accepts_a_correct_answer(capsys):
    check_repeat_kv(repeat_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_repeat_kv_accepts_the_library_function(capsys):
    from lessons_lib.attention import repeat_kv_heads
    check_repeat_kv(repeat_kv_heads)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_repeat_kv_rejects_tiled_heads():
    with pytest.raises(CheckFailed, match="tiled"):
        check_repeat_kv(lambda k, n_rep: k.repeat(1, n_rep, 1, 1))


def test_repeat_kv_rejects_repeating_the_wrong_axis():
    with pytest.raises(CheckFailed, match="expected shape"):
        check_repeat_kv(lambda k, n_rep: k.repeat_interleave(n_rep, dim=2))


def test_repeat_kv_rejects_a_list():
    with pytest.raises(CheckFailed, match="torch.Tensor"):
        check_repeat_kv(lambda k, n_rep: [k] * n_rep)


# -----------------------------------------------------------------------------
# the key/value cache's size


def kv_bytes_right(n_layer, n_head, n_kv_head, head_dim, n_tokens, bytes_per_value):
    return 2 * n_layer * n_kv_head * head_dim * n_tokens * bytes_per_value


def test_kv_cache_bytes_accepts_a_correct_answer(capsys):
    check_kv_cache_bytes(kv_bytes_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_kv_cache_bytes_agrees_with_the_library_cache():
    from lessons_lib.llama import LlamaConfig
    from lessons_lib.model import KVCache
    config = LlamaConfig(vocab_size=10, n_layer=3, n_embd=32, n_head=4, n_kv_head=2, n_ff=8,
                         block_size=16)
    cache = KVCache(config, batch_size=1, max_len=16)
    assert cache.nbytes == kv_bytes_right(3, 4, 2, 8, 16, 4)


def test_kv_cache_bytes_rejects_counting_query_heads():
    def query_heads(n_layer, n_head, n_kv_head, head_dim, n_tokens, bytes_per_value):
        return 2 * n_layer * n_head * head_dim * n_tokens * bytes_per_value
    with pytest.raises(CheckFailed, match="query head"):
        check_kv_cache_bytes(query_heads)


def test_kv_cache_bytes_rejects_keys_only():
    def keys_only(n_layer, n_head, n_kv_head, head_dim, n_tokens, bytes_per_value):
        return n_layer * n_kv_head * head_dim * n_tokens * bytes_per_value
    with pytest.raises(CheckFailed, match="keys and the values"):
        check_kv_cache_bytes(keys_only)


def test_kv_cache_bytes_rejects_forgetting_the_bytes():
    def values_not_bytes(n_layer, n_head, n_kv_head, head_dim, n_tokens, bytes_per_value):
        return 2 * n_layer * n_kv_head * head_dim * n_tokens
    with pytest.raises(CheckFailed, match="bytes_per_value"):
        check_kv_cache_bytes(values_not_bytes)


def test_kv_cache_bytes_rejects_a_tensor_of_many_values():
    with pytest.raises(CheckFailed, match="single number"):
        check_kv_cache_bytes(lambda *args: torch.ones(2))


def test_checkers_reject_a_called_function():
    with pytest.raises(CheckFailed, match="without calling it"):
        check_kv_cache_bytes(kv_bytes_right(1, 1, 1, 1, 1, 1))
