"""Chapter 4's checkers accept a correct solution and reject plausible wrong ones."""

import math

import pytest
import torch

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch04 import (check_merge_heads, check_mha_param_count,
                                        check_multi_head_attention, check_split_heads)


# --- solutions, written as a learner would (no lessons_lib) ----------------------------

def split_heads(x, n_heads):
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x):
    B, h, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, h * hd)


def mha_param_count(d_model, n_heads, bias):
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def multi_head_attention(x, W_q, W_k, W_v, W_o, n_heads, causal):
    B, T, d = x.shape
    q, k, v = (split_heads(x @ W, n_heads) for W in (W_q, W_k, W_v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // n_heads)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return merge_heads(scores.softmax(dim=-1) @ v) @ W_o


# --- accepted -------------------------------------------------------------------------

def test_solutions_pass(capsys):
    check_split_heads(split_heads)
    check_merge_heads(merge_heads)
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
        q, k, v = (split_heads(x @ W, n_heads) for W in (W_q, W_k, W_v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)          # wrong scale
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return merge_heads(scores.softmax(dim=-1) @ v) @ W_o
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
        check_split_heads(split_heads(torch.zeros(1, 2, 4), 2))
