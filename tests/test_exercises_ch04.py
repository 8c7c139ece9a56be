"""Chapter 4's checkers accept a correct solution and reject plausible wrong ones."""

import math
import re

import pytest
import torch

from lessons_lib.attention import MultiHeadAttention, merge_heads, split_heads
from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises import ch04
from lessons_lib.exercises.ch04 import (check_merge_heads, check_mha_param_count,
                                        check_multi_head_attention, check_split_heads)


# --- solutions, written as a learner would (no lessons_lib), under the notebook's names ----

def my_split_heads(x, n_heads):
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def my_merge_heads(x):
    B, h, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, h * hd)


def mha_param_count(d_model, n_heads, bias):
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def multi_head_attention(x, W_q, W_k, W_v, W_o, n_heads, causal):
    B, T, d = x.shape
    q, k, v = (my_split_heads(x @ W, n_heads) for W in (W_q, W_k, W_v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // n_heads)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return my_merge_heads(scores.softmax(dim=-1) @ v) @ W_o


# --- accepted -------------------------------------------------------------------------

def test_solutions_pass(capsys):
    check_split_heads(my_split_heads)
    check_merge_heads(my_merge_heads)
    check_mha_param_count(mha_param_count)
    check_multi_head_attention(multi_head_attention)
    out = capsys.readouterr().out
    assert out.count("checks passed") == 4


# --- rejected -------------------------------------------------------------------------

def test_split_heads_without_transpose_fails():
    def wrong(x, n_heads):                     # a bare view mixes positions and heads
        B, T, C = x.shape
        return x.reshape(B, n_heads, T, C // n_heads)
    with pytest.raises(CheckFailed, match=r"(?s)check_split_heads: not yet.*values differ") as err:
        check_split_heads(wrong)
    assert "transpose" in str(err.value)


def test_split_heads_wrong_shape_fails():
    def wrong(x, n_heads):                     # forgot to move the head axis forward
        B, T, C = x.shape
        return x.view(B, T, n_heads, C // n_heads)
    with pytest.raises(CheckFailed, match="expected shape"):
        check_split_heads(wrong)


def test_merge_heads_without_transpose_fails():
    def wrong(x):
        B, h, T, hd = x.shape
        return x.reshape(B, T, h * hd)
    with pytest.raises(CheckFailed, match="check_merge_heads: not yet"):
        check_merge_heads(wrong)


def test_merge_heads_that_raises_is_reported():
    def wrong(x):
        B, h, T, hd = x.shape
        return x.transpose(1, 2).view(B, T, h * hd)   # view on a non-contiguous tensor
    with pytest.raises(CheckFailed, match="raised RuntimeError"):
        check_merge_heads(wrong)


def test_param_count_without_output_projection_fails():
    def wrong(d_model, n_heads, bias):
        return 3 * d_model * d_model + (3 * d_model if bias else 0)
    with pytest.raises(CheckFailed, match="expected 16640"):
        check_mha_param_count(wrong)


def test_param_count_growing_with_heads_fails():
    def wrong(d_model, n_heads, bias):         # one full-width projection per head
        return n_heads * 3 * d_model * d_model + d_model * d_model + (4 * d_model if bias else 0)
    with pytest.raises(CheckFailed, match="n_heads=4"):
        check_mha_param_count(wrong)


def test_mha_scaled_by_d_model_fails():
    def wrong(x, W_q, W_k, W_v, W_o, n_heads, causal):
        B, T, d = x.shape
        q, k, v = (my_split_heads(x @ W, n_heads) for W in (W_q, W_k, W_v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)          # wrong scale
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return my_merge_heads(scores.softmax(dim=-1) @ v) @ W_o
    with pytest.raises(CheckFailed, match="head_dim"):
        check_multi_head_attention(wrong)


def test_mha_ignoring_causal_fails():
    def wrong(x, W_q, W_k, W_v, W_o, n_heads, causal):
        return multi_head_attention(x, W_q, W_k, W_v, W_o, n_heads, False)
    with pytest.raises(CheckFailed, match="causal=True"):
        check_multi_head_attention(wrong)


def test_mha_one_wide_head_fails():
    def wrong(x, W_q, W_k, W_v, W_o, n_heads, causal):
        return multi_head_attention(x, W_q, W_k, W_v, W_o, 1, causal)
    with pytest.raises(CheckFailed, match="n_heads=2"):
        check_multi_head_attention(wrong)


def test_checker_needs_the_function_itself():
    with pytest.raises(CheckFailed, match="without calling it"):
        check_split_heads(my_split_heads(torch.zeros(1, 2, 4), 2))


def test_the_library_also_passes(capsys):
    check_split_heads(split_heads)
    check_merge_heads(merge_heads)
    check_multi_head_attention(
        lambda x, *Ws_h_causal: _library_mha(x, *Ws_h_causal))
    assert capsys.readouterr().out.count("checks passed") == 3


def _library_mha(x, W_q, W_k, W_v, W_o, n_heads, causal):
    m = MultiHeadAttention(x.shape[-1], n_heads, bias=False, causal=causal).double().eval()
    with torch.no_grad():
        m.c_attn.weight.copy_(torch.cat([W_q, W_k, W_v], dim=1).T)
        m.c_proj.weight.copy_(W_o.T)
        return m(x)


# --- the checker's references are right (against PyTorch) ------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_multihead_attention(causal):
    torch.manual_seed(0)
    B, T, d, h = 2, 5, 12, 3
    x = torch.randn(B, T, d, dtype=torch.float64)
    torch_mha = torch.nn.MultiheadAttention(d, h, bias=False, batch_first=True).double()
    W_q, W_k, W_v = (w.T for w in torch_mha.in_proj_weight.detach().chunk(3))
    W_o = torch_mha.out_proj.weight.detach().T
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    want, _ = torch_mha(x, x, x, attn_mask=mask, need_weights=False)
    got = ch04._mha_ref(x, W_q, W_k, W_v, W_o, h, causal)
    assert torch.allclose(got, want.detach(), atol=1e-10)


def test_split_and_merge_references_are_inverse():
    x = torch.randn(2, 5, 12)
    assert torch.equal(ch04._merge_ref(ch04._split_ref(x, 3)), x)
    assert torch.equal(ch04._split_ref(x, 3)[:, 1], x[..., 4:8])


# --- failures help debugging ------------------------------------------------------------

def test_failing_random_case_prints_a_line_that_rebuilds_it():
    def wrong(x, n_heads):
        B, T, C = x.shape
        return x.reshape(B, n_heads, T, C // n_heads)
    with pytest.raises(CheckFailed) as err:
        check_split_heads(wrong)
    line = re.search(r"To rerun this case: (.*)", str(err.value)).group(1)
    scope = {"torch": torch}
    exec(line, scope)
    assert torch.equal(ch04._split_ref(scope["x"], scope["n_heads"]),
                       my_split_heads(scope["x"], scope["n_heads"]))
    assert not torch.equal(wrong(scope["x"], scope["n_heads"]),
                           my_split_heads(scope["x"], scope["n_heads"]))


def test_mha_rebuild_line_rebuilds_the_case():
    def wrong(x, W_q, W_k, W_v, W_o, n_heads, causal):
        return multi_head_attention(x, W_q, W_k, W_v, W_o, n_heads, False)
    with pytest.raises(CheckFailed) as err:
        check_multi_head_attention(wrong)
    line = re.search(r"To rerun this case: (.*)", str(err.value)).group(1)
    scope = {"torch": torch}
    exec(line, scope)
    args = [scope[n] for n in ("x", "W_q", "W_k", "W_v", "W_o", "n_heads", "causal")]
    assert scope["causal"] is True and scope["x"].dtype == torch.float64
    assert not torch.allclose(wrong(*args), multi_head_attention(*args))


def test_a_raising_learner_function_keeps_its_traceback():
    def broken(x):
        raise IndexError("my bug")
    with pytest.raises(CheckFailed, match="raised IndexError: my bug") as err:
        check_merge_heads(broken)
    assert isinstance(err.value.__cause__, IndexError)
    assert "To rerun this case" in str(err.value)
