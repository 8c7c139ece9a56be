"""Checkers for chapter 03's exercises (self-attention).

Each checker calls the learner's function on hidden inputs and compares with answers computed
here in float64 by a straightforward, numerically careful reference (not lessons_lib's
attention, which the tests compare with PyTorch's). Random inputs are built from their own
seed, and a failing random case prints the line that rebuilds it.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, compare_close, randn, randn_call, run_cases

__all__ = ["check_softmax", "check_causal_mask", "check_attention", "check_attention_entropy"]


# -----------------------------------------------------------------------------
# references (float64, stable)

def _softmax_ref(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.amax(dim=-1, keepdim=True)
    e = x.exp()
    return e / e.sum(dim=-1, keepdim=True)


def _attention_ref(q, k, v, mask=None):
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = _softmax_ref(scores)
    return weights @ v.double(), weights


def _entropy_ref(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(dim=-1)


# -----------------------------------------------------------------------------
# 1. a numerically stable softmax

def check_softmax(fn) -> None:
    """``fn(x)`` returns softmax over the last dimension of a float tensor ``x`` of any shape,
    without overflowing on large entries and giving 0 weight to ``-inf`` entries."""
    __tracebackhide__ = True
    cases = []
    for description, x, hint in [
        ("a 1-D tensor [1.0, 2.0, 3.0]", torch.tensor([1.0, 2.0, 3.0]), ""),
        ("a (4, 6) tensor of random numbers (softmax over each row)", (4, 6),
         "normalise over the LAST dimension (dim=-1), so that each row sums to 1"),
        ("a (2, 3, 5) tensor (two leading batch dimensions)", (2, 3, 5),
         "use dim=-1 and keepdim=True so the shapes broadcast for any number of dimensions"),
        ("large scores [1000.0, 1001.0, 1002.0]", torch.tensor([1000.0, 1001.0, 1002.0]),
         "exp(1000) overflows to inf and inf / inf is nan; subtract each row's maximum first "
         "(softmax(x) = softmax(x - c) for any constant c)"),
        ("very negative scores [-1000.0, -1001.0, -999.0]", torch.tensor([-1000.0, -1001.0, -999.0]),
         "exp(-1000) underflows to 0 and 0 / 0 is nan; subtracting the row maximum fixes this too"),
        ("a row with -inf entries (masked positions) [0.5, -inf, 1.5, -inf]",
         torch.tensor([0.5, float("-inf"), 1.5, float("-inf")]),
         "exp(-inf) is exactly 0, so masked positions should get weight 0 and the rest sum to 1"),
    ]:
        rebuild = ""
        if isinstance(x, tuple):               # a random case: built from its own seed
            rebuild = f"x = {randn_call(*x, seed=len(cases))}"
            x = randn(*x, seed=len(cases))
        cases.append(Case(description, args=(x.clone(),), expected=_softmax_ref(x).float(),
                          compare=compare_close(rtol=1e-4, atol=1e-6), hint=hint, rebuild=rebuild))
    run_cases("check_softmax", fn, cases)


# -----------------------------------------------------------------------------
# 2. the causal mask

def _compare_mask(got, expected) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, got a {type(got).__name__}"
    if got.dtype != torch.bool:
        return (f"expected dtype torch.bool (True = may attend), got dtype {got.dtype}; "
                "compare with a boolean operation or call .bool()")
    if tuple(got.shape) != tuple(expected.shape):
        return f"expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}"
    if torch.equal(got, expected):
        return None
    if torch.equal(got, ~expected):
        return ("your mask is exactly inverted: here True means 'may attend' (PyTorch's convention), "
                "so True belongs on and below the diagonal")
    if torch.equal(got, expected.T):
        return "your mask is transposed: row t (a query) may see columns 0..t (keys), not t..T-1"
    if torch.equal(got, expected & ~torch.eye(len(expected), dtype=torch.bool)):
        return "the diagonal is False: a position must be allowed to attend to itself"
    return f"expected {expected.int().tolist()}\n     got {got.int().tolist()}"


def check_causal_mask(fn) -> None:
    """``fn(T)`` returns a (T, T) bool tensor, True where query t may attend to key s (s <= t)."""
    __tracebackhide__ = True
    cases = [Case(f"T = {T}", args=(T,), expected=torch.ones(T, T, dtype=torch.bool).tril(),
                  compare=_compare_mask) for T in (1, 2, 4, 7)]
    run_cases("check_causal_mask", fn, cases)


# -----------------------------------------------------------------------------
# 3. scaled dot-product attention

def _attention_variant(q, k, v, mask=None, scale=None, invert_mask=False):
    """The reference with one plausible mistake built in, to recognise it in a learner's answer."""
    scale = math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.double() @ k.double().transpose(-2, -1) / scale
    if mask is not None:
        scores = scores.masked_fill(mask if invert_mask else ~mask, float("-inf"))
    weights = _softmax_ref(scores)
    return weights @ v.double(), weights


def _attention_comparer(q, k, v, mask=None):
    """Compare ``(output, weights)`` with the reference; name the mistake when we recognise it."""
    d_k = q.shape[-1]
    known_mistakes = [
        (dict(scale=d_k), "you divided the scores by d_k; divide by its square root, math.sqrt(d_k)"),
        (dict(scale=1.0), "you did not scale the scores; divide q @ k^T by math.sqrt(d_k)"),
    ]
    if mask is not None:
        known_mistakes.append((dict(invert_mask=True),
                               "your mask is inverted: True means 'may attend', so fill the scores "
                               "where the mask is False, scores.masked_fill(~mask, float('-inf'))"))

    def compare(got, expected) -> str | None:
        if not (isinstance(got, tuple) and len(got) == 2):
            return (f"expected a tuple (output, weights), got a {type(got).__name__}; "
                    "end your function with `return output, weights`")
        problem = None
        for name, g, e in (("output", got[0], expected[0]), ("weights", got[1], expected[1])):
            problem = compare_close(rtol=1e-4, atol=1e-5)(g, e.float())
            if problem:
                problem = f"{name}: {problem}"
                break
        if problem is None:
            return None
        weights = got[1]                       # wrong: can we name the mistake?
        if isinstance(weights, torch.Tensor) and weights.is_floating_point():
            for kwargs, message in known_mistakes:
                wrong = _attention_variant(q, k, v, mask, **kwargs)[1].float()
                if weights.shape == wrong.shape and torch.allclose(weights.float(), wrong, rtol=1e-4,
                                                                   atol=1e-5, equal_nan=True):
                    return message
        for name, g in (("output", got[0]), ("weights", got[1])):
            if isinstance(g, torch.Tensor) and g.is_floating_point() and torch.isnan(g).any():
                return (f"your {name} contains nan: exp() of a large score overflowed, or a row "
                        "divided 0 by 0. Subtract each row's maximum before exp()")
        return problem
    return compare


def _qkv(seed: int, q_shape, k_shape, v_shape, scale: float = 1.0):
    """q, k, v drawn from seeds ``seed``, ``seed + 1``, ``seed + 2`` (q and k times ``scale``),
    and the line of Python that rebuilds them."""
    shapes = (q_shape, k_shape, v_shape)
    tensors = [randn(*shape, seed=seed + i) for i, shape in enumerate(shapes)]
    calls = [randn_call(*shape, seed=seed + i) for i, shape in enumerate(shapes)]
    if scale != 1.0:
        tensors[0], tensors[1] = scale * tensors[0], scale * tensors[1]
        calls[0], calls[1] = f"{scale:g} * {calls[0]}", f"{scale:g} * {calls[1]}"
    return tuple(tensors), "q, k, v = " + ", ".join(calls)


def check_attention(fn) -> None:
    """``fn(q, k, v, mask=None)`` returns ``(output, weights)`` of softmax(q k^T / sqrt(d_k)) v,
    for any leading batch dimensions, with an optional bool mask (True = may attend)."""
    __tracebackhide__ = True
    cases = []

    def add(description, qkv, hint, mask=None):
        (q, k, v), rebuild = qkv
        kwargs = {}
        if mask is not None:
            kwargs = {"mask": mask}
            rebuild += f"; mask = torch.ones({len(mask)}, {len(mask)}, dtype=torch.bool).tril()"
        cases.append(Case(description, args=(q, k, v), kwargs=kwargs,
                          expected=_attention_ref(q, k, v, mask),
                          compare=_attention_comparer(q, k, v, mask), hint=hint, rebuild=rebuild))

    add("3 tokens, d_k = 4, d_v = 2, no batch dimension", _qkv(10, (3, 4), (3, 4), (3, 2)),
        "scores = q @ k.transpose(-2, -1) / math.sqrt(d_k), with d_k = q.shape[-1]")
    add("batch dimensions (2, 3), 4 queries, 6 keys, d_k = 8, d_v = 5",
        _qkv(20, (2, 3, 4, 8), (2, 3, 6, 8), (2, 3, 6, 5)),
        "transpose only the last two dimensions of k: k.transpose(-2, -1), not k.T")
    add("d_k = 16, where dividing by d_k instead of sqrt(d_k) makes a difference",
        _qkv(30, (5, 16), (5, 16), (5, 16)), "divide the scores by the SQUARE ROOT of d_k")
    add("a (5, 5) causal mask (True = may attend), batch of 2", _qkv(40, (2, 5, 8), (2, 5, 8), (2, 5, 8)),
        "set the scores where mask is False to -inf before the softmax: "
        "scores.masked_fill(~mask, float('-inf'))", mask=torch.ones(5, 5, dtype=torch.bool).tril())
    add("huge scores (entries of q and k around 40) that overflow a naive exp()",
        _qkv(50, (1, 4, 8), (1, 4, 8), (1, 4, 3), scale=40.0),
        "subtract each row's maximum score before exp(), or use torch.softmax")
    run_cases("check_attention", fn, cases)


# -----------------------------------------------------------------------------
# 4. the entropy of attention rows

def check_attention_entropy(fn) -> None:
    """``fn(weights)`` returns the entropy in nats of each row (last dimension) of a tensor of
    attention weights, with 0 * log(0) counted as 0."""
    __tracebackhide__ = True
    rand = _softmax_ref(randn(3, 4, 6, seed=60)).float()
    cases = []
    for description, w, hint, rebuild in [
        ("a uniform row over 4 keys (entropy ln 4)", torch.full((4,), 0.25), "", ""),
        ("a (2, 3) tensor of rows [0.2, 0.3, 0.5] and [0.6, 0.2, 0.2]",
         torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]),
         "entropy = -sum(w * log(w)) over the LAST dimension; the result has one number per row", ""),
        ("a one-hot row [0, 1, 0, 0] (entropy 0)", torch.tensor([0.0, 1.0, 0.0, 0.0]),
         "log(0) is -inf and 0 * -inf is nan: count 0 * log(0) as 0, e.g. with torch.where(w > 0, ...) "
         "or torch.special.xlogy(w, w)", ""),
        ("causal weights with zeros above the diagonal", torch.ones(4, 4).tril() / torch.arange(1, 5)[:, None],
         "masked keys have weight exactly 0; they must add 0 to the entropy, not nan",
         "weights = torch.ones(4, 4).tril() / torch.arange(1, 5)[:, None]"),
        ("random (3, 4, 6) weights", rand, "work over the last dimension only",
         f"weights = {randn_call(3, 4, 6, seed=60)}.softmax(dim=-1)"),
    ]:
        cases.append(Case(description, args=(w.clone(),), expected=_entropy_ref(w).float(),
                          compare=compare_close(rtol=1e-4, atol=1e-5), hint=hint, rebuild=rebuild))
    run_cases("check_attention_entropy", fn, cases)
