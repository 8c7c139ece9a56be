"""Checkers for chapter 06's exercises (the GPT: a block's forward pass, memory, compute, tying).

Expected answers come from direct computations written here: the block's forward pass from
its weights with ``torch.nn.functional`` (layer norm, linear maps, softmax, GELU), the FLOPs
by listing every matrix product, the bytes by the accounting stated in the exercise. None
comes from the lessons_lib code the exercise teaches. Where a wrong answer has a typical
cause, the message names it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import GPT, Block, GPTConfig
from ._core import Case, _short, as_int, compare_close, generator, run_cases

__all__ = ["check_block_forward", "check_training_memory", "check_forward_flops", "check_tie_head"]


# -----------------------------------------------------------------------------
# exercise: a Block's forward pass, from its submodules' weights

_BLOCK_SHAPES = {1: (1, 3, 8, 1), 2: (2, 5, 16, 4), 3: (3, 9, 24, 3), 4: (2, 17, 32, 8)}


def block_case(seed: int) -> tuple[Block, torch.Tensor]:
    """The block and input of ``check_block_forward``'s case ``seed`` (1 to 4): a causal
    ``Block`` whose weights, biases and LayerNorm gains are all random (so that every mistake
    shows), and ``x`` of shape (batch, T, n_embd)."""
    if seed not in _BLOCK_SHAPES:
        raise ValueError(f"block_case takes a seed in {sorted(_BLOCK_SHAPES)}, got {seed!r}")
    B, T, d, h = _BLOCK_SHAPES[seed]
    g = generator(600 + seed)
    block = Block(d, h).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.3))
        block.ln_1.weight.add_(1.0)
        block.ln_2.weight.add_(1.0)
    x = torch.randn(B, T, d, generator=g)
    return block, x


def _block_reference(block: Block, x: torch.Tensor, *, causal=True, scale=True, pre_norm=True,
                     gelu="tanh", residual=True, same_norm=False) -> torch.Tensor:
    """A pre-LN block computed from its weights; the keywords give the usual mistakes."""
    B, T, d = x.shape
    h = block.attn.n_heads
    hd = d // h
    ln_1, ln_2 = block.ln_1, (block.ln_1 if same_norm else block.ln_2)
    W_attn, W_out = block.attn.c_attn, block.attn.c_proj
    W_fc, W_proj = block.mlp.c_fc, block.mlp.c_proj

    def norm(t, ln):
        return F.layer_norm(t, (d,), ln.weight, ln.bias, ln.eps)

    def attention(t):
        q, k, v = F.linear(t, W_attn.weight, W_attn.bias).split(d, dim=-1)
        q, k, v = (z.reshape(B, T, h, hd).transpose(1, 2) for z in (q, k, v))  # (B, h, T, hd)
        scores = q @ k.transpose(-2, -1)
        if scale:
            scores = scores / math.sqrt(hd)
        if causal:
            future = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        return F.linear(y, W_out.weight, W_out.bias)

    def mlp(t):
        u = F.gelu(F.linear(t, W_fc.weight, W_fc.bias), approximate=gelu)
        return F.linear(u, W_proj.weight, W_proj.bias)

    with torch.no_grad():
        if not pre_norm:                               # post-LN: normalise after adding
            x = norm(x + attention(x), ln_1)
            return norm(x + mlp(x), ln_2)
        if not residual:
            return mlp(norm(attention(norm(x, ln_1)), ln_2))
        x = x + attention(norm(x, ln_1))
        return x + mlp(norm(x, ln_2))


_BLOCK_MISTAKES = [
    (dict(causal=False), "no causal mask: position t must not read positions after t (set the "
                         "scores above the diagonal to -inf before the softmax)"),
    (dict(scale=False), "the scores are missing the 1/sqrt(head_dim) scaling (head_dim, not n_embd)"),
    (dict(pre_norm=False), "this is a post-LN block (LayerNorm after adding). GPT-2's block "
                           "normalises the input of each sub-layer: x + attn(ln_1(x))"),
    (dict(gelu="none"), "the GELU is the exact one; GPT-2 (and this Block) uses the tanh "
                        "approximation: F.gelu(u, approximate='tanh')"),
    (dict(residual=False), "the residual connections are missing: each sub-layer's output is "
                           "ADDED to its input, x = x + ..."),
    (dict(same_norm=True), "the MLP's input is normalised with ln_1; it has its own LayerNorm, ln_2"),
]


def _block_problem(got, expected: torch.Tensor, block: Block, x: torch.Tensor, called: list) -> str | None:
    if called:
        name = next(n for n in ("block", "block.attn", "block.mlp") if n in called)
        return (f"your function called {name} itself; the exercise is to write what it does. "
                "Use only the LayerNorms (block.ln_1, block.ln_2) and the Linear layers "
                "(block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)")
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor of shape {tuple(expected.shape)}, got {_short(got)}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"expected shape {tuple(expected.shape)} (the shape of x), got {tuple(got.shape)}"
    got = got.detach().float()
    if torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return None
    for mistake, message in _BLOCK_MISTAKES:
        if torch.allclose(got, _block_reference(block, x, **mistake), rtol=1e-4, atol=1e-4):
            return message
    worst = (got - expected).abs().max().item()
    first_bad = (got - expected).abs().amax(dim=(0, 2)).gt(1e-4).nonzero()[0].item()
    return (f"the output differs from the block's (largest difference {worst:.3g}); the first "
            f"position that differs is {first_bad}"
            + (" (position 0 sees only itself: look at the LayerNorms, the linear maps and the "
               "MLP)" if first_bad == 0 else " (position 0 is right: look at how positions mix "
                                              "in attention, the heads and the mask)"))


def check_block_forward(fn) -> None:
    """Grade ``fn(block, x) -> y``: a pre-LN GPT block's forward pass, written with its
    LayerNorms and Linear layers only (not ``block``, ``block.attn`` or ``block.mlp``).
    ``x`` is (batch, T, n_embd); attention is causal, with ``block.attn.n_heads`` heads."""
    __tracebackhide__ = True
    cases = []
    for seed, (B, T, d, h) in _BLOCK_SHAPES.items():
        block, x = block_case(seed)
        called: list = []
        for name, module in (("block", block), ("block.attn", block.attn), ("block.mlp", block.mlp)):
            module.register_forward_hook(lambda m, i, o, name=name, called=called: called.append(name))
        cases.append(Case(
            f"a block of width {d} with {h} head{'s' * (h > 1)}, x of shape {(B, T, d)}",
            (block, x.clone()), _block_reference(block, x),
            hint="ln_1, then c_attn gives q | k | v side by side (split at n_embd); each goes to "
                 "(batch, heads, T, head_dim); causal softmax of q k^T / sqrt(head_dim); merge the "
                 "heads back; c_proj; add to x. Then ln_2, c_fc, GELU (tanh), c_proj; add again",
            compare=lambda got, exp, block=block, x=x, called=called: _block_problem(got, exp, block, x, called),
            rebuild=f"from lessons_lib.exercises.ch06 import block_case; block, x = block_case({seed})"))
    run_cases("check_block_forward", fn, cases)


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
# exercise: the compute of one forward pass

def _matmuls(n_layer: int, d: int, V: int, T: int) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of every matrix product in a forward pass over T tokens,
    grouped: a product of (m, k) by (k, n) costs 2 m k n."""
    def mm(m, k, n):
        return 2 * m * k * n
    per_layer_weights = mm(T, d, 3 * d) + mm(T, d, d) + mm(T, d, 4 * d) + mm(T, 4 * d, d)
    per_layer_attention = mm(T, d, T) + mm(T, T, d)     # q k^T and weights @ v, all heads together
    return {"weights": n_layer * per_layer_weights, "attention": n_layer * per_layer_attention,
            "head": mm(T, d, V)}


def _flops_problem(got, expected: int, args: tuple) -> str | None:
    value, problem = as_int(got, "a whole number of FLOPs (an int)")
    if problem:
        return problem
    if value == expected:
        return None
    n_layer, d, V, T = args
    parts = _matmuls(n_layer, d, V, T)
    if value * 2 == expected:
        return (f"expected {expected:,}, got {value:,}: exactly half. Count a multiply-add as 2 "
                "FLOPs: a product of (m, k) by (k, n) costs 2 m k n")
    if value == expected - parts["head"]:
        return (f"expected {expected:,}, got {value:,}: the output head is missing; it is tied, so it "
                "has no parameters of its own, but it still multiplies every position by a (d, V) matrix")
    if value == expected - parts["attention"]:
        return (f"expected {expected:,}, got {value:,}: the attention products q k^T and "
                "weights @ v are missing; they involve no weights, but cost 2 T T d each per layer")
    if value == expected - parts["attention"] // 2:
        return (f"expected {expected:,}, got {value:,}: you halved the attention products for the "
                "causal mask; count the full T x T products, as PyTorch's kernels compute them")
    return f"expected {expected:,}, got {value:,} ({value - expected:+,})"


def check_forward_flops(fn) -> None:
    """Grade ``fn(n_layer, n_embd, vocab_size, T) -> int``: the FLOPs of the matrix products in
    one forward pass of a GPT over one sequence of T tokens (2 per multiply-add; the full T x T
    attention products; the head included; LayerNorms, softmax, GELU and additions left out)."""
    __tracebackhide__ = True
    cases = []
    for args in [(1, 8, 10, 1), (1, 8, 10, 4), (2, 64, 64, 64), (12, 768, 50257, 1024),
                 (3, 40, 7, 100), (96, 12288, 50257, 2048)]:
        n_layer, d, V, T = args
        cases.append(Case(f"n_layer={n_layer}, n_embd={d}, vocab_size={V}, T={T}", args,
                          sum(_matmuls(*args).values()),
                          hint="per layer: c_attn (T, d) x (d, 3d), c_proj (T, d) x (d, d), c_fc "
                               "(T, d) x (d, 4d), the MLP's c_proj (T, 4d) x (4d, d), and attention "
                               "itself: q k^T is (T, d) x (d, T) over all heads, weights @ v is "
                               "(T, T) x (T, d); then the head, (T, d) x (d, V)",
                          compare=lambda got, exp, args=args: _flops_problem(got, exp, args)))
    run_cases("check_forward_flops", fn, cases)


# -----------------------------------------------------------------------------
# exercise: tie the output head to the token embedding

_TIE_CONFIGS = [dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8),
                dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)]


def _tie_problem(got, expected, state: dict) -> str | None:
    model, config = state["model"], state["config"]
    if got is not None and got is not model:
        return "return nothing (or the same model): change the model in place"
    if model.wte.weight is not state["wte"] or not torch.equal(model.wte.weight.detach(), state["embedding"]):
        return "the token embedding changed; keep wte as it is and make the head use it"
    if model.lm_head.weight is not model.wte.weight:
        if torch.equal(model.lm_head.weight.detach(), model.wte.weight.detach()):
            return ("lm_head.weight holds a copy of the embedding, not the embedding itself: the two "
                    "would drift apart in training. Make the head's weight the same Parameter object")
        return "lm_head.weight is not the token embedding's Parameter (model.wte.weight)"
    after = model.num_parameters()
    if state["before"] - after != config.vocab_size * config.n_embd:
        return (f"the model should lose vocab_size x n_embd parameters, it went from "
                f"{state['before']:,} to {after:,}")
    captured = []
    hook = model.ln_f.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        logits, _ = model(state["idx"])
    hook.remove()
    if not torch.allclose(logits, captured[0] @ state["embedding"].T, atol=1e-5):
        return "the logits are not ln_f(x) @ wte.weight.T: the head should compute with the embedding matrix"
    return None


def check_tie_head(fn) -> None:
    """Grade ``fn(model)``: given a GPT built with ``tie_weights=False``, make its output head use
    the token embedding matrix itself (one Parameter, counted once)."""
    __tracebackhide__ = True
    cases = []
    for i, sizes in enumerate(_TIE_CONFIGS, 1):
        torch.manual_seed(i)
        config = GPTConfig(**sizes, tie_weights=False)
        model = GPT(config)
        state = {"model": model, "config": config, "before": model.num_parameters(),
                 "wte": model.wte.weight, "embedding": model.wte.weight.detach().clone(),
                 "idx": torch.randint(config.vocab_size, (2, 5), generator=generator(i))}
        call = ", ".join(f"{k}={v}" for k, v in sizes.items())
        cases.append(Case(f"an untied GPT with vocab_size={config.vocab_size}, n_embd={config.n_embd}",
                          (model,), None, compare=lambda got, exp, state=state: _tie_problem(got, exp, state),
                          rebuild=f"model = GPT(GPTConfig({call}, tie_weights=False))"))
    run_cases("check_tie_head", fn, cases)
