"""Checkers for chapter 06's exercises (the GPT: parameters, memory, mixture of experts, tying).

Expected answers come from ``lessons_lib.model.count_parameters`` (which the tests check against
models built on the meta device and against Hugging Face's GPT-2) or from the formulas stated
in each exercise. Where a wrong answer has a typical cause, the message names it.
"""

from __future__ import annotations

import math

import torch

from ..model import GPT, GPTConfig, count_parameters
from ._core import Case, CheckFailed, _short, compare_close, compare_equal, run_cases  # noqa: F401

__all__ = ["check_count_gpt_parameters", "check_training_memory", "check_moe_parameters",
           "check_tie_head"]


def _as_int(got) -> tuple[int | None, str | None]:
    if isinstance(got, torch.Tensor) and got.numel() == 1 and not got.dtype.is_floating_point:
        got = int(got)
    if isinstance(got, float) and got.is_integer():
        got = int(got)
    if isinstance(got, bool) or not isinstance(got, int):
        return None, f"expected a whole number of parameters (an int), got {_short(got)}"
    return got, None


# -----------------------------------------------------------------------------
# exercise: count a GPT's parameters from its configuration

_COUNT_CONFIGS = [
    dict(n_layer=1, n_embd=8, vocab_size=10, block_size=4),
    dict(n_layer=2, n_embd=64, vocab_size=64, block_size=64),
    dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024),      # GPT-2 small
    dict(n_layer=24, n_embd=1024, vocab_size=50257, block_size=1024),     # GPT-2 medium
    dict(n_layer=96, n_embd=12288, vocab_size=50257, block_size=2048),    # GPT-3 175B
    dict(n_layer=5, n_embd=40, vocab_size=3, block_size=1000),
]


def _count_problem(got, expected: int, config: dict) -> str | None:
    value, problem = _as_int(got)
    if problem:
        return problem
    if value == expected:
        return None
    d, V, T, L = config["n_embd"], config["vocab_size"], config["block_size"], config["n_layer"]
    diff = value - expected
    if diff == V * d:
        return (f"expected {expected:,}, got {value:,}: exactly vocab_size x n_embd = {V * d:,} too many. "
                "The output head is tied to the token embedding: it is the same matrix, counted once")
    if diff == -T * d:
        return f"expected {expected:,}, got {value:,}: the position embeddings (block_size x n_embd) are missing"
    if diff == -2 * d:
        return f"expected {expected:,}, got {value:,}: 2 x n_embd short, the final LayerNorm (ln_f) is missing"
    if diff == -(2 * L + 1) * 2 * d:
        return f"expected {expected:,}, got {value:,}: the LayerNorms' gains and biases (2 x n_embd each) are missing"
    if diff == -L * 13 * d:
        return (f"expected {expected:,}, got {value:,}: 13 x n_embd per layer short, which is every Linear "
                "layer's bias (3d + d in attention, 4d + d in the MLP)")
    return f"expected {expected:,}, got {value:,} ({diff:+,})"


def check_count_gpt_parameters(fn) -> None:
    """Grade ``fn(n_layer, n_embd, vocab_size, block_size) -> int``: the number of parameters of
    a GPT-2-style model (learned positions, biases everywhere, tied head, 4x MLP)."""
    __tracebackhide__ = True
    cases = []
    for cfg in _COUNT_CONFIGS:
        expected = count_parameters(GPTConfig(n_head=1, **cfg))
        cases.append(Case(f"n_layer={cfg['n_layer']}, n_embd={cfg['n_embd']}, vocab_size={cfg['vocab_size']}, "
                          f"block_size={cfg['block_size']}",
                          (cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"], cfg["block_size"]), expected,
                          hint="add up: token and position embeddings; per layer two LayerNorms (gain and "
                               "bias), c_attn (d x 3d + 3d), c_proj (d x d + d), c_fc (d x 4d + 4d), "
                               "mlp c_proj (4d x d + d); the final LayerNorm; the head adds nothing",
                          compare=lambda got, exp, cfg=cfg: _count_problem(got, exp, cfg)))
    run_cases("check_count_gpt_parameters", fn, cases)


# -----------------------------------------------------------------------------
# exercise: memory for training

_BYTES = {"fp32": 4 + 4 + 8, "mixed": 2 + 2 + 4 + 8, "bf16": 2 + 2 + 4}


def check_training_memory(fn) -> None:
    """Grade ``fn(n_params, precision) -> bytes`` for training with Adam, activations left out:
    "fp32" (weights, gradients, two Adam moments, all fp32: 16 bytes per parameter),
    "mixed" (bf16 weights and gradients, an fp32 master copy and fp32 moments: 16 bytes),
    "bf16" (everything in bf16: 8 bytes)."""
    __tracebackhide__ = True
    hints = {"fp32": "4 bytes for each weight, 4 for its gradient, and Adam keeps two fp32 numbers "
                     "per weight (the moving averages m and v)",
             "mixed": "mixed precision keeps bf16 weights and gradients (2 + 2 bytes) but also an fp32 "
                      "master copy of the weights (4) and the fp32 Adam moments (4 + 4)",
             "bf16": "weights, gradients, m and v, each 2 bytes"}
    cases = []
    for n, precision in [(1, "fp32"), (1000, "fp32"), (124_439_808, "fp32"), (1, "mixed"),
                         (174_604_259_328, "mixed"), (1, "bf16"), (1_557_611_200, "bf16")]:
        cases.append(Case(f"n_params={n:,}, precision={precision!r}", (n, precision), n * _BYTES[precision],
                          hint=hints[precision], compare=compare_close(rtol=1e-9, atol=0)))
    run_cases("check_training_memory", fn, cases)


# -----------------------------------------------------------------------------
# exercise: a mixture of experts, total and active parameters

def moe_reference(n_layer: int, n_embd: int, vocab_size: int, block_size: int, n_experts: int,
                  top_k: int) -> tuple[int, int]:
    """(total, active) for a GPT-2-style model whose every MLP is replaced by ``n_experts``
    MLPs of the same size and a bias-free router Linear(n_embd, n_experts); each token uses
    ``top_k`` experts. Embeddings, attention, LayerNorms and routers count as active."""
    dense = count_parameters(GPTConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
                                       block_size=block_size, n_head=1), split=True)
    one_mlp = dense["mlp"] // n_layer
    shared = dense["total"] - dense["mlp"] + n_layer * n_embd * n_experts     # + routers
    return shared + n_layer * n_experts * one_mlp, shared + n_layer * top_k * one_mlp


def _moe_problem(got, expected: tuple[int, int], args: tuple) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a pair (total, active), got {_short(got)}"
    values = []
    for g in got:
        value, problem = _as_int(g)
        if problem:
            return problem
        values.append(value)
    total, active = values
    n_layer, d, _, _, E, k = args
    if (total, active) == expected:
        return None
    if (active, total) == expected:
        return "the pair is the wrong way round: return (total, active), total first"
    if total != expected[0]:
        if total - expected[0] == -n_layer * d * E:
            return f"total: expected {expected[0]:,}, got {total:,}: the routers (n_embd x n_experts per layer) are missing"
        return f"total: expected {expected[0]:,}, got {total:,}"
    if active - expected[1] == -n_layer * d * E:
        return f"active: expected {expected[1]:,}, got {active:,}: every token also runs its layer's router"
    return (f"active: expected {expected[1]:,}, got {active:,}. Only the MLP part changes: a token runs "
            f"{k} of the {E} experts, and everything else")


def check_moe_parameters(fn) -> None:
    """Grade ``fn(n_layer, n_embd, vocab_size, block_size, n_experts, top_k) -> (total, active)``."""
    __tracebackhide__ = True
    cases = []
    for args in [(1, 8, 10, 4, 2, 1), (2, 64, 64, 64, 4, 2), (12, 768, 50257, 1024, 8, 2),
                 (96, 12288, 50257, 2048, 8, 2), (4, 32, 100, 16, 16, 16), (3, 16, 20, 8, 64, 1)]:
        cases.append(Case(f"n_layer={args[0]}, n_embd={args[1]}, vocab_size={args[2]}, block_size={args[3]}, "
                          f"n_experts={args[4]}, top_k={args[5]}", args, moe_reference(*args),
                          hint="start from the dense count; one MLP has 8 d^2 + 5 d parameters; total "
                               "stores n_experts of them per layer, active uses top_k; add a router "
                               "(d x n_experts, no bias) per layer to both",
                          compare=lambda got, exp, args=args: _moe_problem(got, exp, args)))
    run_cases("check_moe_parameters", fn, cases)


# -----------------------------------------------------------------------------
# exercise: tie the output head to the token embedding

def _tie_problem(fn, config: GPTConfig, seed: int) -> str | None:
    torch.manual_seed(seed)
    model = GPT(config)                     # built untied
    before = model.num_parameters()
    wte = model.wte.weight
    embedding = wte.detach().clone()
    idx = torch.randint(config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(seed))
    out = fn(model)
    if out is not None and out is not model:
        return "return nothing (or the same model): change the model in place"
    if model.wte.weight is not wte or not torch.equal(model.wte.weight.detach(), embedding):
        return "the token embedding changed; keep wte as it is and make the head use it"
    if model.lm_head.weight is not model.wte.weight:
        if torch.equal(model.lm_head.weight.detach(), model.wte.weight.detach()):
            return ("lm_head.weight holds a copy of the embedding, not the embedding itself: the two would "
                    "drift apart in training. Assign the Parameter: model.lm_head.weight = model.wte.weight")
        return "lm_head.weight is not the token embedding's Parameter (model.wte.weight)"
    after = model.num_parameters()
    if before - after != config.vocab_size * config.n_embd:
        return f"the model should lose vocab_size x n_embd parameters, it went from {before:,} to {after:,}"
    captured = []
    hook = model.ln_f.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        logits, _ = model(idx)
    hook.remove()
    if not torch.allclose(logits, captured[0] @ embedding.T, atol=1e-5):
        return "the logits are not ln_f(x) @ wte.weight.T: the head should compute with the embedding matrix"
    return None


def check_tie_head(fn) -> None:
    """Grade ``fn(model)``: given a GPT built with ``tie_weights=False``, make its output head use
    the token embedding matrix itself (one Parameter, counted once)."""
    __tracebackhide__ = True
    if not callable(fn):
        raise CheckFailed(f"check_tie_head: pass your function itself (without calling it), got {_short(fn)}")
    configs = [GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, tie_weights=False),
               GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, tie_weights=False)]
    for i, config in enumerate(configs, 1):
        try:
            problem = _tie_problem(fn, config, seed=i)
        except Exception as err:
            raise CheckFailed(f"check_tie_head: check {i} of {len(configs)} raised "
                              f"{type(err).__name__}: {err}") from None
        if problem:
            raise CheckFailed(f"check_tie_head: not yet. Check {i} of {len(configs)} failed "
                              f"(vocab_size={config.vocab_size}, n_embd={config.n_embd}):\n  {problem}")
    print(f"check_tie_head: all {len(configs)} checks passed")
