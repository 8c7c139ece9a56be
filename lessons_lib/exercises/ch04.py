"""Checkers for chapter 04's exercises (multi-head attention).

Each checker builds its hidden cases from seeded random tensors and computes the expected
answer with lessons_lib's own implementation, which the tests compare with PyTorch's.
"""

from __future__ import annotations

import torch

from ..attention import MultiHeadAttention, merge_heads, split_heads
from ._core import Case, CheckFailed, compare_close, compare_equal, run_cases  # noqa: F401

__all__ = ["check_split_heads", "check_merge_heads", "check_mha_param_count",
           "check_multi_head_attention"]


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def check_split_heads(fn) -> None:
    """``fn(x, n_heads)``: (B, T, C) -> (B, n_heads, T, C // n_heads), head h holding the
    features ``h*hd:(h+1)*hd`` of every position."""
    __tracebackhide__ = True
    hint = ("reshape to (B, T, n_heads, head_dim) first, so each position's features are cut "
            "into n_heads consecutive pieces, then swap the T and n_heads axes with .transpose(1, 2)")
    cases = []
    for i, (B, T, C, h) in enumerate([(1, 3, 4, 2), (2, 5, 12, 3), (3, 4, 8, 1), (2, 6, 16, 8)]):
        x = _randn(B, T, C, seed=100 + i)
        cases.append(Case(f"x of shape {(B, T, C)} with n_heads={h}", (x, h), split_heads(x, h),
                          hint=hint, compare=compare_close(rtol=0, atol=0)))
    run_cases("check_split_heads", fn, cases)


def check_merge_heads(fn) -> None:
    """``fn(x)``: (B, n_heads, T, head_dim) -> (B, T, n_heads * head_dim), the inverse of
    split_heads: position t gets head 0's features, then head 1's, and so on."""
    __tracebackhide__ = True
    hint = ("bring T next to the batch first with .transpose(1, 2), giving (B, T, n_heads, head_dim), "
            "then .reshape(B, T, n_heads * head_dim); reshaping without the transpose mixes positions")
    cases = []
    for i, (B, h, T, hd) in enumerate([(1, 2, 3, 2), (2, 3, 5, 4), (3, 1, 4, 8), (2, 8, 6, 2)]):
        x = _randn(B, h, T, hd, seed=200 + i)
        cases.append(Case(f"x of shape {(B, h, T, hd)}", (x,), merge_heads(x),
                          hint=hint, compare=compare_close(rtol=0, atol=0)))
    run_cases("check_merge_heads", fn, cases)


def check_mha_param_count(fn) -> None:
    """``fn(d_model, n_heads, bias)``: the number of parameters of a multi-head attention
    layer (W^Q, W^K, W^V, W^O and, if ``bias``, their biases)."""
    __tracebackhide__ = True
    cases = []
    for d, h, bias in [(64, 4, True), (64, 1, True), (64, 16, True), (48, 3, False), (768, 12, True),
                       (128, 8, False)]:
        count = sum(p.numel() for p in MultiHeadAttention(d, h, bias=bias).parameters())
        cases.append(Case(f"d_model={d}, n_heads={h}, bias={bias}", (d, h, bias), count,
                          hint="each of the four projections is a (d_model x d_model) matrix, "
                               "whatever the number of heads; each bias has d_model entries"))
    run_cases("check_mha_param_count", fn, cases)


def _reference_mha(x, W_q, W_k, W_v, W_o, n_heads, causal):
    d = x.shape[-1]
    m = MultiHeadAttention(d, n_heads, bias=False, causal=causal).to(x.dtype).eval()
    with torch.no_grad():
        # nn.Linear computes x @ weight.T, so the weight is the transposed matrix
        m.c_attn.weight.copy_(torch.cat([W_q, W_k, W_v], dim=1).T)
        m.c_proj.weight.copy_(W_o.T)
        return m(x)


def check_multi_head_attention(fn) -> None:
    """``fn(x, W_q, W_k, W_v, W_o, n_heads, causal)``: multi-head self-attention without
    biases; ``x`` is (B, T, d_model), each W is (d_model, d_model) and multiplies from the
    right (``x @ W_q``); ``causal=True`` lets position t attend to positions 0..t only."""
    __tracebackhide__ = True
    cases = []
    for i, (B, T, d, h, causal) in enumerate([(1, 4, 8, 2, False), (2, 5, 12, 3, True),
                                              (2, 6, 16, 1, False), (1, 7, 16, 4, True),
                                              (3, 3, 24, 6, False)]):
        x = _randn(B, T, d, seed=300 + i, dtype=torch.float64)
        Ws = [_randn(d, d, seed=400 + 10 * i + j, dtype=torch.float64) / d ** 0.5 for j in range(4)]
        expected = _reference_mha(x, *Ws, h, causal)
        cases.append(Case(f"x of shape {(B, T, d)}, n_heads={h}, causal={causal}",
                          (x, *Ws, h, causal), expected, compare=compare_close(rtol=1e-6, atol=1e-8),
                          hint="project, split into heads, scale the scores by 1/sqrt(head_dim) "
                               "(not d_model), mask with -inf where a key is in the future, softmax "
                               "over the keys, multiply by V, merge the heads, then apply W_o"))
    run_cases("check_multi_head_attention", fn, cases)
