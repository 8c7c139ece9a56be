"""Checkers for chapter 04's exercises (multi-head attention).

Each checker builds its hidden cases from seeded random tensors (every case carries the line
that rebuilds it) and computes the expected answer with a reference written here, head by
head with slices and loops, independently of ``lessons_lib.attention``; the parameter count
comes from PyTorch's own ``torch.nn.MultiheadAttention``.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, compare_close, randn, randn_call, run_cases

__all__ = ["check_split_heads", "check_merge_heads", "check_mha_param_count",
           "check_multi_head_attention"]


# -----------------------------------------------------------------------------
# references: one head at a time, by slicing the feature axis

def _split_ref(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_heads, T, hd): head i is the slice i*hd:(i+1)*hd of each position."""
    hd = x.shape[-1] // n_heads
    return torch.stack([x[..., i * hd:(i + 1) * hd] for i in range(n_heads)], dim=1)


def _merge_ref(x: torch.Tensor) -> torch.Tensor:
    """(B, n_heads, T, hd) -> (B, T, n_heads * hd): head 0's features, then head 1's, ..."""
    return torch.cat([x[:, i] for i in range(x.shape[1])], dim=-1)


def _mha_ref(x, W_q, W_k, W_v, W_o, n_heads, causal):
    """Multi-head self-attention in float64, one head at a time, softmax written out."""
    x, W_q, W_k, W_v, W_o = (t.double() for t in (x, W_q, W_k, W_v, W_o))
    T, d = x.shape[-2], x.shape[-1]
    hd = d // n_heads
    heads = []
    for i in range(n_heads):
        cols = slice(i * hd, (i + 1) * hd)
        q, k, v = x @ W_q[:, cols], x @ W_k[:, cols], x @ W_v[:, cols]
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if causal:
            future = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        scores = scores - scores.amax(dim=-1, keepdim=True)
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        heads.append(weights @ v)
    return torch.cat(heads, dim=-1) @ W_o


# -----------------------------------------------------------------------------
# 1. split the heads

def check_split_heads(fn) -> None:
    """``fn(x, n_heads)``: (B, T, C) -> (B, n_heads, T, C // n_heads), head h holding the
    features ``h*hd:(h+1)*hd`` of every position."""
    __tracebackhide__ = True
    hint = ("reshape to (B, T, n_heads, head_dim) first, so each position's features are cut "
            "into n_heads consecutive pieces, then swap the T and n_heads axes with .transpose(1, 2)")
    cases = []
    for i, (B, T, C, h) in enumerate([(1, 3, 4, 2), (2, 5, 12, 3), (3, 4, 8, 1), (2, 6, 16, 8)]):
        x = randn(B, T, C, seed=100 + i)
        cases.append(Case(f"x of shape {(B, T, C)} with n_heads={h}", (x, h), _split_ref(x, h),
                          hint=hint, compare=compare_close(rtol=0, atol=0),
                          rebuild=f"x = {randn_call(B, T, C, seed=100 + i)}; n_heads = {h}"))
    run_cases("check_split_heads", fn, cases)


# -----------------------------------------------------------------------------
# 2. merge the heads

def check_merge_heads(fn) -> None:
    """``fn(x)``: (B, n_heads, T, head_dim) -> (B, T, n_heads * head_dim), the inverse of
    splitting: position t gets head 0's features, then head 1's, and so on."""
    __tracebackhide__ = True
    hint = ("bring T next to the batch first with .transpose(1, 2), giving (B, T, n_heads, head_dim), "
            "then .reshape(B, T, n_heads * head_dim); reshaping without the transpose mixes positions")
    cases = []
    for i, (B, h, T, hd) in enumerate([(1, 2, 3, 2), (2, 3, 5, 4), (3, 1, 4, 8), (2, 8, 6, 2)]):
        x = randn(B, h, T, hd, seed=200 + i)
        cases.append(Case(f"x of shape {(B, h, T, hd)}", (x,), _merge_ref(x),
                          hint=hint, compare=compare_close(rtol=0, atol=0),
                          rebuild=f"x = {randn_call(B, h, T, hd, seed=200 + i)}"))
    run_cases("check_merge_heads", fn, cases)


# -----------------------------------------------------------------------------
# 3. count the parameters

def check_mha_param_count(fn) -> None:
    """``fn(d_model, n_heads, bias)``: the number of parameters of a multi-head attention
    layer (W^Q, W^K, W^V, W^O and, if ``bias``, their biases)."""
    __tracebackhide__ = True
    cases = []
    for d, h, bias in [(64, 4, True), (64, 1, True), (64, 16, True), (48, 3, False), (768, 12, True),
                       (128, 8, False)]:
        # PyTorch's own module, which nobody here wrote, is the answer key
        count = sum(p.numel() for p in torch.nn.MultiheadAttention(d, h, bias=bias).parameters())
        cases.append(Case(f"d_model={d}, n_heads={h}, bias={bias}", (d, h, bias), count,
                          hint="each of the four projections is a (d_model x d_model) matrix, "
                               "whatever the number of heads; each bias has d_model entries"))
    run_cases("check_mha_param_count", fn, cases)


# -----------------------------------------------------------------------------
# 4. multi-head attention from scratch

def check_multi_head_attention(fn) -> None:
    """``fn(x, W_q, W_k, W_v, W_o, n_heads, causal)``: multi-head self-attention without
    biases; ``x`` is (B, T, d_model), each W is (d_model, d_model) and multiplies from the
    right (``x @ W_q``); ``causal=True`` lets position t attend to positions 0..t only."""
    __tracebackhide__ = True
    cases = []
    for i, (B, T, d, h, causal) in enumerate([(1, 4, 8, 2, False), (2, 5, 12, 3, True),
                                              (2, 6, 16, 1, False), (1, 7, 16, 4, True),
                                              (3, 3, 24, 6, False)]):
        x = randn(B, T, d, seed=300 + i, dtype=torch.float64)
        Ws = [randn(d, d, seed=400 + 10 * i + j, dtype=torch.float64) / d ** 0.5 for j in range(4)]
        weights = ", ".join(f"{randn_call(d, d, seed=400 + 10 * i + j)[:-1]}, dtype=torch.float64)"
                            f" / {d} ** 0.5" for j in range(4))
        rebuild = (f"x = {randn_call(B, T, d, seed=300 + i)[:-1]}, dtype=torch.float64); "
                   f"W_q, W_k, W_v, W_o = {weights}; n_heads, causal = {h}, {causal}")
        cases.append(Case(f"x of shape {(B, T, d)}, n_heads={h}, causal={causal}",
                          (x, *Ws, h, causal), _mha_ref(x, *Ws, h, causal),
                          compare=compare_close(rtol=1e-6, atol=1e-8), rebuild=rebuild,
                          hint="project, split into heads, scale the scores by 1/sqrt(head_dim) "
                               "(not d_model), mask with -inf where a key is in the future, softmax "
                               "over the keys, multiply by V, merge the heads, then apply W_o"))
    run_cases("check_multi_head_attention", fn, cases)
