"""Checkers for chapter 07's exercises (pre-training: the schedule, top-k, the KV cache, the score).

Expected answers come from references written here, independent of the lessons_lib code each
exercise teaches: the warmup + cosine formula computed directly, top-k by sorting each row,
PyTorch's ``scaled_dot_product_attention``, and the loss over windows computed with
``F.cross_entropy`` one window at a time. (The tests check ``lr_at``, ``filter_logits`` and
``evaluate_split`` against the same references.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import GPT, GPTConfig
from ._core import Case, _short, as_number, generator, randn_call, run_cases

__all__ = ["check_lr_schedule", "check_top_k_filter", "check_attend_one_step", "check_whole_split_loss"]


def _lr_reference(step: int, max_steps: int, warmup: int, lr: float, ratio: float) -> float:
    """Linear warmup to ``lr`` (step s < warmup: lr (s + 1) / warmup), then half a cosine from
    ``lr`` at step ``warmup`` to ``lr * ratio`` at ``max_steps``, flat after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _top_k_reference(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest entries (found by sorting the row), the rest -inf."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        order = sorted(range(logits.shape[1]), key=lambda j: -logits[r, j].item())
        for j in order[:k]:
            out[r, j] = logits[r, j]
    return out


def _window_loss_reference(model, ids: torch.Tensor, block_size: int, keep: int | None = None) -> float:
    """Mean cross-entropy over every prediction of ``ids`` (or the first ``keep``), window by
    window, each window from a fresh context."""
    inputs, targets = ids[:-1], ids[1:]
    n = len(inputs) if keep is None else keep
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            logits, _ = model(inputs[start:stop][None])
            total += F.cross_entropy(logits[0].float(), targets[start:stop], reduction="sum").item()
    return total / n


# -----------------------------------------------------------------------------
# exercise: warmup then cosine

def _lr_problem(got, expected: float, args: tuple) -> str | None:
    step, max_steps, warmup, lr, ratio = args
    value, problem = as_number(got, "a number (the learning rate)")
    if problem:
        return problem
    if math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12):
        return None
    if step < warmup and math.isclose(value, lr * step / warmup, rel_tol=1e-6, abs_tol=1e-12):
        return (f"expected {expected:.6g}, got {value:.6g}: the warmup should reach lr * (step + 1) / warmup_steps, "
                "so that step 0 already moves the weights and step warmup_steps - 1 is at the full rate")
    if step >= warmup and ratio > 0:
        progress = (step - warmup) / max(1, max_steps - warmup)
        if math.isclose(value, lr * 0.5 * (1 + math.cos(math.pi * progress)), rel_tol=1e-6, abs_tol=1e-12):
            return (f"expected {expected:.6g}, got {value:.6g}: the cosine should end at lr * min_lr_ratio, "
                    "not at zero")
    return f"expected {expected:.6g}, got {value:.6g}"


def check_lr_schedule(fn) -> None:
    """Grade ``fn(step, max_steps, warmup_steps, lr, min_lr_ratio) -> float``: a linear warmup to ``lr`` over ``warmup_steps`` steps (step
    ``s`` < warmup gets ``lr * (s + 1) / warmup_steps``), then a cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at step ``max_steps``."""
    __tracebackhide__ = True
    cases = []
    for args in [(0, 100, 10, 1e-3, 0.1), (4, 100, 10, 1e-3, 0.1), (9, 100, 10, 1e-3, 0.1),
                 (10, 100, 10, 1e-3, 0.1), (55, 100, 10, 1e-3, 0.1), (99, 100, 10, 1e-3, 0.1),
                 (100, 100, 10, 1e-3, 0.1), (0, 50, 0, 3e-3, 0.0), (37, 50, 0, 3e-3, 0.0),
                 (1500, 3000, 90, 3e-3, 0.1)]:
        step, max_steps, warmup, lr, ratio = args
        expected = _lr_reference(*args)
        cases.append(Case(f"step={step}, max_steps={max_steps}, warmup_steps={warmup}, lr={lr}, "
                          f"min_lr_ratio={ratio}", args, expected,
                          compare=lambda got, exp, args=args: _lr_problem(got, exp, args)))
    run_cases("check_lr_schedule", fn, cases)


# -----------------------------------------------------------------------------
# exercise: top-k filtering

def _top_k_problem(got, expected: torch.Tensor, logits: torch.Tensor, k: int) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor of logits, got {_short(got)}"
    if got.shape != expected.shape:
        return f"expected shape {tuple(expected.shape)} (the shape of the logits), got {tuple(got.shape)}"
    kept_expected, kept = torch.isfinite(expected), torch.isfinite(got)
    if torch.equal(kept, kept_expected):
        if torch.allclose(got[kept], expected[kept]):
            return None
        return ("the right tokens are kept, but their values changed: return the logits themselves "
                "(sampling applies temperature and softmax afterwards)")
    if bool(kept.all()) and torch.allclose(got[kept_expected], expected[kept_expected]):
        return ("the tokens outside the top k must become float('-inf'), so that softmax gives them "
                "probability exactly 0; a logit of 0 (or any finite number) keeps some probability")
    n_kept = kept.sum(-1)
    if bool((n_kept == k + 1).all()) or bool((n_kept == k - 1).all()):
        return f"each row should keep {k} tokens, yours keeps {int(n_kept[0])}: an off-by-one"
    if bool((n_kept == k).all()):
        return ("each row keeps k tokens, but not the k largest logits of that row "
                "(did you take the top k of the whole tensor, or along the wrong dimension?)")
    return f"the tokens kept differ from the {k} largest logits of each row: expected {_short(kept_expected)}, got {_short(kept)}"


def check_top_k_filter(fn) -> None:
    """Grade ``fn(logits, k)``: the same logits with every entry outside each row's ``k``
    largest set to ``-inf`` (``logits`` of shape (batch, vocab))."""
    __tracebackhide__ = True
    cases = []
    for i, (B, V, k) in enumerate([(1, 5, 2), (3, 10, 1), (4, 64, 5), (2, 7, 7), (5, 30, 12)]):
        logits = 3 * torch.randn(B, V, generator=generator(700 + i))
        expected = _top_k_reference(logits, k)
        cases.append(Case(f"logits of shape {(B, V)} with k={k}", (logits.clone(), k), expected,
                          rebuild=f"logits, k = 3 * {randn_call(B, V, seed=700 + i)}, {k}",
                          hint="torch.topk(logits, k, dim=-1).values[..., -1:] is the k-th largest logit of each "
                               "row; keep what is >= it (masked_fill the rest with float('-inf'))",
                          compare=lambda got, exp, logits=logits, k=k: _top_k_problem(got, exp, logits, k)))
    run_cases("check_top_k_filter", fn, cases)


# -----------------------------------------------------------------------------
# exercise: one step of the KV cache

def attend_case(B: int, h: int, t: int, hd: int, seed: int):
    """The arguments of one ``check_attend_one_step`` case, and its expected (output, k, v)."""
    g = generator(seed)
    q_all, k_all, v_all = (torch.randn(B, h, t + 1, hd, generator=g) for _ in range(3))
    full = F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True)
    args = (q_all[:, :, -1:], k_all[:, :, -1:], v_all[:, :, -1:], k_all[:, :, :-1].clone(), v_all[:, :, :-1].clone())
    return args, (full[:, :, -1:], k_all, v_all)


def _attend_problem(got, expected, args) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return f"expected a triple (output, k_cache, v_cache), got {_short(got)}"
    out, k_cache, v_cache = got
    want_out, want_k, want_v = expected
    for name, g, w in (("k_cache", k_cache, want_k), ("v_cache", v_cache, want_v)):
        if not isinstance(g, torch.Tensor):
            return f"expected {name} as a tensor, got {_short(g)}"
        if g.shape != w.shape:
            return (f"{name} should grow by one position to shape {tuple(w.shape)}, got {tuple(g.shape)}: "
                    "append the new keys and values along the positions axis (dim=2)")
        if not torch.allclose(g, w):
            return f"{name} should be the old cache followed by the new position (torch.cat along dim=2)"
    if not isinstance(out, torch.Tensor) or out.shape != want_out.shape:
        return f"expected the output of shape {tuple(want_out.shape)}, got {_short(out)}"
    if torch.allclose(out, want_out, atol=1e-5):
        return None
    q, k_new, v_new, k_old, v_old = args
    without_self = F.scaled_dot_product_attention(q, k_old, v_old) if k_old.shape[2] else None
    if without_self is not None and torch.allclose(out, without_self, atol=1e-5):
        return "the new token must also attend to itself: attend over the cache AFTER appending its key and value"
    unscaled = torch.softmax(q @ want_k.transpose(-2, -1), dim=-1) @ want_v
    if torch.allclose(out, unscaled, atol=1e-5):
        return "the scores are missing the 1/sqrt(head_dim) scaling"
    worst = (out - want_out).abs().max().item()
    return f"the output differs from attention over all cached positions (largest difference {worst:.3g})"


def check_attend_one_step(fn) -> None:
    """Grade ``fn(q, k_new, v_new, k_cache, v_cache) -> (output, k_cache, v_cache)``: one decoding
    step. ``q``, ``k_new``, ``v_new`` are (B, heads, 1, head_dim) for the newest token; the caches
    are (B, heads, t, head_dim) for the t tokens before it. Append the new key and value to the
    caches, then let the query attend to all t + 1 positions."""
    __tracebackhide__ = True
    cases = []
    for i, shape in enumerate([(1, 1, 3, 4), (2, 4, 7, 8), (1, 2, 1, 16), (3, 2, 20, 8)]):
        args, expected = attend_case(*shape, seed=800 + i)
        call = ", ".join(map(str, shape))
        cases.append(Case(f"batch {shape[0]}, {shape[1]} heads, {shape[2]} cached positions, head_dim {shape[3]}",
                          args, expected, compare=lambda got, exp, args=args: _attend_problem(got, exp, args),
                          rebuild="from lessons_lib.exercises.ch07 import attend_case; "
                                  f"args, _ = attend_case({call}, seed={800 + i})"))
    run_cases("check_attend_one_step", fn, cases)


# -----------------------------------------------------------------------------
# exercise: the exact score on a whole split

def _loss_problem(got, expected: float, model, ids: torch.Tensor, block_size: int) -> str | None:
    value, problem = as_number(got, "one number (nats per token)")
    if problem:
        return problem
    if math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-5):
        return None
    n = len(ids) - 1
    full = n // block_size
    if full and full * block_size < n:
        dropped = _window_loss_reference(model, ids, block_size, keep=full * block_size)
        if math.isclose(value, dropped, rel_tol=1e-4, abs_tol=1e-5):
            return (f"expected {expected:.5f}, got {value:.5f}: the last {n - full * block_size} predictions "
                    f"(a window shorter than block_size) are missing. Every token must count")
    return f"expected {expected:.5f}, got {value:.5f}"


_LOSS_CASES = [(33, 16), (50, 16), (40, 7), (17, 16), (2, 16), (100, 1)]


def _loss_model() -> GPT:
    torch.manual_seed(900)
    return GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


def loss_case(i: int):
    """``(model, ids, block_size)`` of ``check_whole_split_loss``'s case ``i`` (0 to 5)."""
    n_ids, block_size = _LOSS_CASES[i]
    return _loss_model(), torch.randint(13, (n_ids,), generator=generator(910 + i)), block_size


def check_whole_split_loss(fn) -> None:
    """Grade ``fn(model, ids, block_size) -> float``: the mean next-token loss over every
    prediction in the 1-D tensor ``ids``, in consecutive non-overlapping windows of
    ``block_size`` predictions (the last one shorter if need be), each window from a fresh
    context (what :func:`lessons_lib.pretrained.evaluate_split` computes)."""
    __tracebackhide__ = True
    model = _loss_model()
    cases = []
    for i, (n_ids, block_size) in enumerate(_LOSS_CASES):
        ids = torch.randint(13, (n_ids,), generator=generator(910 + i))
        expected = _window_loss_reference(model, ids, block_size)
        cases.append(Case(f"{n_ids} ids with block_size={block_size}", (model, ids, block_size), expected,
                          rebuild="from lessons_lib.exercises.ch07 import loss_case; "
                                  f"model, ids, block_size = loss_case({i})",
                          hint="inputs are ids[:-1], targets ids[1:]; cut both into windows of block_size; "
                               "sum the losses of every position (reduction='sum') and divide by len(ids) - 1",
                          compare=lambda got, exp, ids=ids, bs=block_size: _loss_problem(got, exp, model, ids, bs)))
    run_cases("check_whole_split_loss", fn, cases)
