"""Checkers for chapter 16's exercises (training on more than one process).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like.

The references are written here, independently of :mod:`lessons_lib.distributed` and
:mod:`lessons_lib.train`: the ZeRO paper's bytes per parameter (Rajbhandari et al., 2020)
stage by stage, the closed-form gradient of a mean squared error over the whole batch, and a
Megatron-style MLP computed unsharded, then cut into the pieces each GPU would compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._core import Case, randn, randn_call, run_cases
from ._core import number_close as _number_close
from ._core import tensor_close as _tensor_close

__all__ = ["check_zero_memory", "check_data_parallel_gradient", "check_tensor_parallel_mlp"]


# -----------------------------------------------------------------------------
# exercise 1: bytes per GPU under the ZeRO stages

def _zero_reference(n_params: int, n_gpus: int, stage: int) -> float:
    weights, grads, adam = 2 * n_params, 2 * n_params, 12 * n_params   # bf16, bf16, fp32 x3
    sharded = {0: 0, 1: adam, 2: adam + grads, 3: adam + grads + weights}[stage]
    return (weights + grads + adam - sharded) + sharded / n_gpus


def _zero_slips(n_params, n_gpus, stage):
    p, n = n_params, n_gpus
    named = {
        "that is every stage's sharding at once (stage 3); stage {s} keeps some states whole":
            16 * p / n,
        "that is the whole 16 bytes per parameter on each GPU (plain data parallelism, "
        "stage 0); stage {s} shards part of it": 16 * p,
        "that is 12 bytes per parameter unsharded and 4 sharded: the sharded part of "
        "stage 1 is the optimizer's 12 (fp32 master weights, Adam's m and v)":
            12 * p + 4 * p / n,
        "that counts the optimizer states as 8 bytes per parameter (m and v); mixed "
        "precision also keeps an fp32 master copy of the weights: 12 bytes":
            _zero_reference(p, n, stage) - 4 * p / (n if stage >= 1 else 1),
        "that is in gigabytes (1e9 bytes); return bytes": _zero_reference(p, n, stage) / 1e9,
    }

    def slips(value: float) -> str | None:
        for message, wrong in named.items():
            if not math.isclose(wrong, _zero_reference(p, n, stage), rel_tol=1e-9) \
                    and math.isclose(value, wrong, rel_tol=1e-6):
                return message.format(s=stage)
        return None
    return slips


def check_zero_memory(fn) -> None:
    """``fn(n_params, n_gpus, stage)`` returns the bytes of model states (bf16 weights and
    gradients, fp32 master weights and Adam's two moments: 2 + 2 + 12 bytes per parameter)
    each of ``n_gpus`` GPUs holds under ZeRO ``stage`` 0 (none sharded), 1 (optimizer states
    sharded), 2 (and gradients) or 3 (and weights: FSDP)."""
    __tracebackhide__ = True
    cases = []
    for n_params, n_gpus, stage, what in [
            (1_000, 4, 0, "1,000 parameters on 4 GPUs, stage 0"),
            (1_000, 4, 1, "1,000 parameters on 4 GPUs, stage 1"),
            (1_000, 4, 2, "1,000 parameters on 4 GPUs, stage 2"),
            (1_000, 4, 3, "1,000 parameters on 4 GPUs, stage 3"),
            (7_500_000_000, 64, 1, "7.5 billion parameters on 64 GPUs, stage 1 (the ZeRO "
                                   "paper's example: 31.4 GB)"),
            (175_000_000_000, 1024, 3, "175 billion parameters on 1,024 GPUs, stage 3"),
            (1_000, 1, 2, "one GPU: every stage holds everything")]:
        cases.append(Case(what, (n_params, n_gpus, stage), _zero_reference(n_params, n_gpus, stage),
                          compare=_number_close(rtol=1e-6, slips=_zero_slips(n_params, n_gpus, stage)),
                          hint="the states are 2 (weights) + 2 (gradients) + 12 (optimizer) bytes "
                               "per parameter; a sharded state is divided by n_gpus"))
    run_cases("check_zero_memory", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the gradient of the combined batch from the parts' gradients

def _mse_gradient(w, xs, ys) -> torch.Tensor:
    """d/dw of mean((X w - y)^2) over all rows of all parts, in closed form: 2/n X^T (X w - y)."""
    X = torch.cat([x.double() for x in xs])
    y = torch.cat([t.double() for t in ys])
    return 2.0 / len(y) * X.T @ (X @ w.double() - y)


def _dp_slips(w, xs, ys):
    grads = [_mse_gradient(w, [x], [y]) for x, y in zip(xs, ys)]
    plain_mean = sum(grads) / len(grads)
    summed = sum(grads)
    equal = len({len(x) for x in xs}) == 1

    def slips(got: torch.Tensor) -> str | None:
        if not equal and torch.allclose(got, plain_mean, rtol=1e-4, atol=1e-6):
            return ("that is the plain mean of the parts' gradients: right when every part "
                    "has as many rows, but these parts differ: weight each part by its rows")
        if len(grads) > 1 and torch.allclose(got, summed, rtol=1e-4, atol=1e-6):
            return "that is the sum of the parts' gradients; the combined loss is a mean"
        return None
    return slips


def check_data_parallel_gradient(fn) -> None:
    """``fn(w, xs, ys)``: a weight vector ``w`` (d,), and the batch cut into parts as processes
    would hold it, ``xs`` a list of (n_i, d) inputs and ``ys`` a list of (n_i,) targets. Returns
    the gradient (d,) of the mean squared error ``mean((x @ w - y)^2)`` over the combined batch,
    computed from each part's own gradient."""
    __tracebackhide__ = True
    cases = []
    setups = [("two equal parts of 4 rows, 3 features (seed 1)", [4, 4], 3, 1),
              ("four equal parts of 2 rows, 5 features (seed 2)", [2, 2, 2, 2], 5, 2),
              ("one part: the whole batch (seed 3)", [6], 3, 3),
              ("unequal parts of 2 and 6 rows (seed 4)", [2, 6], 3, 4),
              ("unequal parts of 1, 3 and 4 rows (seed 5)", [1, 3, 4], 4, 5)]
    for what, sizes, d, seed in setups:
        w = randn(d, seed=seed)
        xs = [randn(n, d, seed=seed * 10 + i) for i, n in enumerate(sizes)]
        ys = [randn(n, seed=seed * 100 + i) for i, n in enumerate(sizes)]
        rebuild = (f"w = {randn_call(d, seed=seed)}; xs = ["
                   + ", ".join(randn_call(n, d, seed=seed * 10 + i) for i, n in enumerate(sizes))
                   + "]; ys = ["
                   + ", ".join(randn_call(n, seed=seed * 100 + i) for i, n in enumerate(sizes)) + "]")
        cases.append(Case(what, (w, xs, ys), _mse_gradient(w, xs, ys),
                          compare=_tensor_close(rtol=1e-4, atol=1e-5, slips=_dp_slips(w, xs, ys)),
                          rebuild=rebuild,
                          hint="the combined mean is sum_i n_i * mean_i / sum_i n_i: each "
                               "part's gradient counts in proportion to its rows"))
    run_cases("check_data_parallel_gradient", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: a Megatron MLP cut over n_shards GPUs

def _mlp_partials(x, w_fc, b_fc, w_proj, n_shards):
    """What GPU i computes: its rows of c_fc (its hidden units) and the matching columns of
    c_proj. Their sum plus c_proj's bias is the MLP's output."""
    hidden = w_fc.shape[0] // n_shards
    parts = []
    for i in range(n_shards):
        rows = slice(i * hidden, (i + 1) * hidden)
        h = F.gelu(x.double() @ w_fc[rows].double().T + b_fc[rows].double(), approximate="tanh")
        parts.append(h @ w_proj[:, rows].double().T)
    return parts


def _compare_partials(n_shards, x, w_fc, b_fc, w_proj):
    full = F.gelu(x.double() @ w_fc.double().T + b_fc.double(), approximate="tanh") @ w_proj.double().T
    close = _tensor_close(rtol=1e-4, atol=1e-5)

    def compare(got, expected) -> str | None:
        if not isinstance(got, (list, tuple)):
            return f"expected a list of {n_shards} tensors (one per GPU), got a {type(got).__name__}"
        if len(got) != n_shards:
            return f"expected {n_shards} partial outputs (one per GPU), got {len(got)}"
        if all(isinstance(g, torch.Tensor) for g in got):
            total = sum(g.double() for g in got)
            if total.shape == full.shape and not torch.allclose(total, full, rtol=1e-4, atol=1e-5):
                return ("the partial outputs do not add up to the MLP's output "
                        "gelu(x @ w_fc.T + b_fc) @ w_proj.T (without c_proj's bias)")
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = close(g, e)
            if problem:
                return (f"GPU {i}'s partial output is wrong: {problem}\n  GPU i holds rows "
                        f"i*h to (i+1)*h of w_fc and b_fc and the same columns of w_proj")
        return None
    return compare


def check_tensor_parallel_mlp(fn) -> None:
    """``fn(x, w_fc, b_fc, w_proj, n_shards)``: x (T, d); c_fc's weight (4d, d) and bias (4d,);
    c_proj's weight (d, 4d), as ``nn.Linear`` stores them. Returns a list of ``n_shards``
    tensors (T, d): GPU i's partial output, from its slice of c_fc's output rows (column
    parallel) and the same slice of c_proj's input columns (row parallel), with GELU's tanh
    approximation. Their sum is the MLP's output before c_proj's bias."""
    __tracebackhide__ = True
    cases = []
    for what, T, d, n_shards, seed in [("T=3, d=4, 2 GPUs (seed 1)", 3, 4, 2, 1),
                                       ("T=5, d=8, 4 GPUs (seed 2)", 5, 8, 4, 2),
                                       ("T=2, d=6, 1 GPU: the whole MLP (seed 3)", 2, 6, 1, 3),
                                       ("T=4, d=6, 3 GPUs (seed 4)", 4, 6, 3, 4)]:
        x, w_fc = randn(T, d, seed=seed), randn(4 * d, d, seed=seed + 10)
        b_fc, w_proj = randn(4 * d, seed=seed + 20), randn(d, 4 * d, seed=seed + 30)
        rebuild = (f"x = {randn_call(T, d, seed=seed)}; w_fc = {randn_call(4 * d, d, seed=seed + 10)}; "
                   f"b_fc = {randn_call(4 * d, seed=seed + 20)}; "
                   f"w_proj = {randn_call(d, 4 * d, seed=seed + 30)}; n_shards = {n_shards}")
        cases.append(Case(what, (x, w_fc, b_fc, w_proj, n_shards),
                          _mlp_partials(x, w_fc, b_fc, w_proj, n_shards),
                          compare=_compare_partials(n_shards, x, w_fc, b_fc, w_proj),
                          rebuild=rebuild,
                          hint="h = 4 * d // n_shards hidden units per GPU; GPU i uses "
                               "w_fc[i*h:(i+1)*h], b_fc[i*h:(i+1)*h] and w_proj[:, i*h:(i+1)*h]"))
    run_cases("check_tensor_parallel_mlp", fn, cases)
