"""Checkers for chapter 14's exercises (RMSNorm, SwiGLU, repeating key/value heads, the size of
a key/value cache).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (LayerNorm's mean subtracted,
epsilon outside the root, the gain forgotten; the gate and up matrices swapped, GELU or ReLU for
SiLU; the heads tiled instead of repeated in place; K or V forgotten, the query heads counted).

The references are written here with plain Python loops over floats, independently of
:mod:`lessons_lib.llama` and :mod:`lessons_lib.attention`.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, generator, run_cases
from ._core import number_close as _number_close
from ._core import tensor_close as _tensor_close

__all__ = ["check_rms_norm", "check_swiglu", "check_repeat_kv", "check_kv_cache_bytes"]


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().double().reshape(-1, x.shape[-1]).tolist()


def _from_rows(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(like.shape).to(like.dtype)


def _matches(got: torch.Tensor, candidate: torch.Tensor) -> bool:
    return got.shape == candidate.shape and torch.allclose(got, candidate.double(), rtol=1e-4,
                                                           atol=1e-5)


# -----------------------------------------------------------------------------
# exercise 1: RMSNorm

def _first_slip(wrong: dict):
    """A function that names the first slip in ``wrong`` (message -> the tensor that slip
    gives) whose tensor ``got`` matches, or returns None."""
    def slips(got):
        for message, candidate in wrong.items():
            if _matches(got, candidate):
                return message
        return None
    return slips


def _rms_norm(x, weight, eps, center=False, eps_outside=False, gain=True):
    g = weight.double().tolist()
    out = []
    for row in _rows(x):
        mean = sum(row) / len(row) if center else 0.0
        row = [v - mean for v in row]
        ms = sum(v * v for v in row) / len(row)
        scale = 1 / (math.sqrt(ms) + eps) if eps_outside else 1 / math.sqrt(ms + eps)
        out.append([v * scale * (g[i] if gain else 1.0) for i, v in enumerate(row)])
    return _from_rows(out, x)


def _rms_slips(x, weight, eps):
    wrong = {
        "that subtracts the mean first, which is LayerNorm; RMSNorm only divides by the root "
        "mean square": _rms_norm(x, weight, eps, center=True),
        "eps goes inside the square root: sqrt(mean(x^2) + eps)":
            _rms_norm(x, weight, eps, eps_outside=True),
        "multiply by the gain `weight` at the end": _rms_norm(x, weight, eps, gain=False),
    }
    return _first_slip(wrong)


def check_rms_norm(fn) -> None:
    """``fn(x, weight, eps)``: ``x`` (..., d) float, ``weight`` (d,). Return
    ``x / sqrt(mean(x^2 over the last axis) + eps) * weight``, the shape of ``x``."""
    __tracebackhide__ = True
    cases = []
    x = torch.tensor([[3.0, 4.0]])
    w = torch.ones(2)
    cases.append(Case("x = [[3, 4]] (root mean square 3.536), weight 1, eps 0",
                      (x, w, 0.0), _rms_norm(x, w, 0.0),
                      compare=_tensor_close(slips=_rms_slips(x, w, 0.0))))
    for seed, (shape, eps) in enumerate([((4, 6), 1e-5), ((2, 3, 8), 0.5), ((5, 4), 1e-6)], 1):
        x = 2 * torch.randn(*shape, generator=generator(seed)) + 1
        w = torch.randn(shape[-1], generator=generator(seed + 10))
        cases.append(Case(f"x of shape {shape} (mean 1, not 0), eps {eps:g}",
                          (x, w, eps), _rms_norm(x, w, eps),
                          compare=_tensor_close(slips=_rms_slips(x, w, eps)),
                          rebuild=f"x = 2 * torch.randn({', '.join(map(str, shape))}, "
                                  f"generator=torch.Generator().manual_seed({seed})) + 1; "
                                  f"weight = torch.randn({shape[-1]}, generator=torch."
                                  f"Generator().manual_seed({seed + 10})); eps = {eps}",
                          hint="x.pow(2).mean(dim=-1, keepdim=True) keeps the last axis for "
                               "broadcasting"))
    run_cases("check_rms_norm", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: SwiGLU

def _act(v: float, kind: str) -> float:
    if kind == "silu":
        return v / (1 + math.exp(-v))
    if kind == "gelu":
        return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))
    return max(v, 0.0)


def _matvec(w: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v)) for row in w]


def _swiglu(x, w_gate, w_up, w_down, act="silu", swap=False):
    g, u, d = (w.detach().double().tolist() for w in (w_gate, w_up, w_down))
    if swap:
        g, u = u, g
    out = []
    for row in _rows(x):
        hidden = [_act(a, act) * b for a, b in zip(_matvec(g, row), _matvec(u, row))]
        out.append(_matvec(d, hidden))
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], len(d)).to(x.dtype)


def _swiglu_slips(*args):
    wrong = {
        "the activation goes on the gate, silu(x @ w_gate.T), not on the up projection":
            _swiglu(*args, swap=True),
        "that looks like GELU; SwiGLU's gate uses SiLU, x * sigmoid(x) (F.silu)":
            _swiglu(*args, act="gelu"),
        "that looks like ReLU; SwiGLU's gate uses SiLU, x * sigmoid(x) (F.silu)":
            _swiglu(*args, act="relu"),
    }
    return _first_slip(wrong)


def check_swiglu(fn) -> None:
    """``fn(x, w_gate, w_up, w_down)``: ``x`` (..., d); ``w_gate``, ``w_up`` (n_ff, d) and
    ``w_down`` (d, n_ff), laid out as ``nn.Linear.weight``. Return
    ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T``, shape (..., d)."""
    __tracebackhide__ = True
    cases = []
    for seed, (lead, d, n_ff) in enumerate([((1,), 2, 3), ((4,), 6, 10), ((2, 3), 8, 12)], 1):
        gen = generator(seed)
        x = torch.randn(*lead, d, generator=gen)
        w_gate, w_up = torch.randn(n_ff, d, generator=gen), torch.randn(n_ff, d, generator=gen)
        w_down = torch.randn(d, n_ff, generator=gen)
        args = (x, w_gate, w_up, w_down)
        cases.append(Case(f"x of shape {(*lead, d)}, a hidden width of {n_ff}", args,
                          _swiglu(*args), compare=_tensor_close(rtol=1e-4, atol=1e-4,
                                                                slips=_swiglu_slips(*args)),
                          rebuild=f"g = torch.Generator().manual_seed({seed}); x = torch.randn("
                                  f"{', '.join(map(str, (*lead, d)))}, generator=g); w_gate = "
                                  f"torch.randn({n_ff}, {d}, generator=g); w_up = torch.randn("
                                  f"{n_ff}, {d}, generator=g); w_down = torch.randn({d}, {n_ff}, "
                                  f"generator=g)",
                          hint="three matrix products: gate and up from x, down from their "
                               "gated product; F.silu is x * sigmoid(x)"))
    run_cases("check_swiglu", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: repeating key/value heads

def _repeat(k: torch.Tensor, n_rep: int, tiled: bool = False) -> torch.Tensor:
    n_kv = k.shape[1]
    if tiled:     # heads 0, 1, 2, 0, 1, 2, ...
        order = [j % n_kv for j in range(n_kv * n_rep)]
    else:         # heads 0, 0, 0, 1, 1, 1, ...
        order = [j // n_rep for j in range(n_kv * n_rep)]
    return torch.stack([k[:, j] for j in order], dim=1)


def check_repeat_kv(fn) -> None:
    """``fn(k, n_rep)``: ``k`` (batch, n_kv_head, T, head_dim). Return (batch, n_kv_head *
    n_rep, T, head_dim) where query head i gets key head i // n_rep: each head repeated n_rep
    times in place (0, 0, 1, 1, ...), the grouping grouped-query attention uses."""
    __tracebackhide__ = True
    def compare_for(k, rep):
        def compare(got, expected):
            problem = _tensor_close(rtol=0, atol=0)(got, expected)
            if problem and isinstance(got, torch.Tensor) and got.shape == expected.shape \
                    and torch.equal(got, _repeat(k, rep, tiled=True)):
                return (f"{problem}\n  the heads come out tiled (0, 1, 2, 0, 1, 2, ...): query "
                        f"head i must read key head i // n_rep, so repeat each head in place "
                        f"(repeat_interleave, not repeat)")
            return problem
        return compare

    cases = []
    k = torch.arange(2.0).reshape(1, 2, 1, 1)
    cases.append(Case("two heads holding 0 and 1, n_rep = 2 (expected heads 0, 0, 1, 1)",
                      (k, 2), _repeat(k, 2), compare=compare_for(k, 2)))
    for seed, (B, n_kv, T, hd, rep) in enumerate([(2, 3, 4, 2, 3), (1, 1, 5, 4, 4),
                                                  (3, 2, 2, 8, 1), (1, 4, 3, 2, 2)], 1):
        k = torch.randn(B, n_kv, T, hd, generator=generator(seed))
        cases.append(Case(f"{n_kv} key heads, n_rep = {rep}, k of shape {(B, n_kv, T, hd)}",
                          (k, rep), _repeat(k, rep), compare=compare_for(k, rep),
                          rebuild=f"k = torch.randn({B}, {n_kv}, {T}, {hd}, generator=torch."
                                  f"Generator().manual_seed({seed})); n_rep = {rep}"))
    run_cases("check_repeat_kv", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: the key/value cache's size

def check_kv_cache_bytes(fn) -> None:
    """``fn(n_layer, n_head, n_kv_head, head_dim, n_tokens, bytes_per_value)``: the bytes a
    key/value cache holds for ``n_tokens`` positions of one sequence. Every layer keeps a key
    and a value vector of ``head_dim`` numbers per key/value head and position (the query
    heads are not cached)."""
    __tracebackhide__ = True
    cases = []
    for args in [(1, 1, 1, 1, 1, 1), (30, 9, 3, 64, 8192, 4), (32, 32, 8, 128, 4096, 2),
                 (12, 12, 12, 64, 1024, 4), (2, 8, 1, 16, 7, 2)]:
        n_layer, n_head, n_kv, hd, n, b = args
        expected = 2 * n_layer * n_kv * hd * n * b
        # later entries win where two slips give the same number: the simplest name last
        wrong = {n_layer * n_head * hd * n * b:
                 "count both keys and values, and only the n_kv_head heads",
                 2 * n_layer * n_kv * hd * n:
                 "that is a count of numbers: multiply by bytes_per_value (4 for float32, 2 "
                 "for bfloat16) to get bytes",
                 2 * n_layer * n_head * hd * n * b:
                 "that counts every query head; only the n_kv_head key/value heads are cached",
                 n_layer * n_kv * hd * n * b: "count both the keys and the values (a factor 2)"}
        wrong.pop(expected, None)

        def slips(value, wrong=wrong):
            return next((m for v, m in wrong.items() if math.isclose(value, v)), None)
        cases.append(Case(f"n_layer={n_layer}, n_head={n_head}, n_kv_head={n_kv}, "
                          f"head_dim={hd}, n_tokens={n}, bytes_per_value={b}", args, expected,
                          compare=_number_close(rtol=0, atol=0.5, slips=slips)))
    run_cases("check_kv_cache_bytes", fn, cases)

