"""Checkers for chapter 01's exercises (predicting the next token).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see and
compares with an answer computed here (with PyTorch where it has one). On a wrong answer it
says which input failed, what was expected and what came back, and where it can, what the
mistake most likely is (a transposed table, a sum instead of a mean, a softmax that overflowed).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..checks import is_int
from ._core import (Case, CheckFailed, _short, as_number, compare_close, generator, randint,
                    randint_call, randn, randn_call, run_cases)

__all__ = [
    "check_bigram_counts",
    "check_cross_entropy",
    "check_sample_bigram",
    "check_make_batch",
    "check_numerical_gradient",
]


# -----------------------------------------------------------------------------
# helpers


_OVERFLOW = ("exp() of a large logit overflows to inf (and inf / inf is nan), and log(0) is -inf "
             "when a probability underflows to zero")


def _compare_scalar(rtol: float = 1e-4, atol: float = 1e-5, what: str = "a single number",
                    not_finite: str = ""):
    """Compare one number; ``not_finite`` explains where a nan or an inf most likely came from."""
    def compare(got, expected) -> str | None:
        value, problem = as_number(got, what)
        if problem:
            bad = re.search(r"got (-?inf|nan)", problem)
            if bad:
                return f"expected about {expected:.6g}, got {bad.group(1)}. {not_finite}".rstrip()
            return problem
        if not math.isclose(value, expected, rel_tol=rtol, abs_tol=atol):
            return f"expected about {expected:.6g}, got {value:.6g}"
        return None
    return compare


def _as_long_list(got, name: str) -> tuple[list[int] | None, str | None]:
    if isinstance(got, torch.Tensor):
        if got.ndim != 1:
            return None, f"expected {name} as a list (or a 1-D tensor), got a tensor of shape {tuple(got.shape)}"
        if got.dtype.is_floating_point:
            return None, f"expected integer token ids in {name}, got dtype {got.dtype}"
        return [int(v) for v in got.tolist()], None
    if not isinstance(got, (list, tuple)):
        return None, f"expected {name} as a list of ints, got {_short(got)}"
    values = []
    for v in got:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
            v = int(v)
        if not is_int(v):
            return None, f"expected integer token ids in {name}, found {v!r} of type {type(v).__name__}"
        values.append(v)
    return values, None


# -----------------------------------------------------------------------------
# exercise: count the bigrams


def _reference_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()):
        counts[a, b] += 1
    return counts


def _compare_counts(got, expected: torch.Tensor) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor of shape {tuple(expected.shape)}, got {_short(got)}"
    if tuple(got.shape) != tuple(expected.shape):
        return (f"expected shape {tuple(expected.shape)} (vocab_size x vocab_size), got shape "
                f"{tuple(got.shape)}. The table needs a row and a column for every id in the "
                f"vocabulary, even ids that never occur in this sequence")
    if got.dtype.is_complex or got.dtype == torch.bool:
        return f"expected counts as numbers, got dtype {got.dtype}"
    got_d, exp_d = got.detach().cpu().double(), expected.double()
    if torch.equal(got_d, exp_d):
        return None
    if torch.equal(got_d, exp_d.T):
        return ("your table is transposed: counts[i, j] must be how often j comes right AFTER i "
                "(row = current token, column = next token)")
    n_pairs = int(expected.sum())
    if float(got_d.sum()) != n_pairs:
        return (f"a sequence of {n_pairs + 1} tokens has {n_pairs} neighbouring pairs, but your counts "
                f"add up to {float(got_d.sum()):g}\nexpected {_short(expected)}\n     got {_short(got)}")
    i, j = (got_d != exp_d).nonzero()[0].tolist()
    return (f"counts[{i}, {j}] (how often {j} follows {i}) should be {int(expected[i, j])}, "
            f"got {got_d[i, j].item():g}\nexpected {_short(expected)}\n     got {_short(got)}")


def check_bigram_counts(fn) -> None:
    """Grade ``fn(ids, vocab_size) -> (vocab_size, vocab_size) tensor`` of bigram counts:
    ``counts[i, j]`` = how often id ``j`` comes right after id ``i`` in the 1-D tensor ``ids``."""
    __tracebackhide__ = True
    cases = []
    for description, ids, vocab_size, rebuild in [
        ("ids [0, 1, 2, 1, 2] with vocab_size 3", [0, 1, 2, 1, 2], 3, ""),
        ("ids [2, 2, 2, 2] (the same pair three times) with vocab_size 4", [2, 2, 2, 2], 4, ""),
        ("ids [1, 0] with vocab_size 5 (most ids never occur)", [1, 0], 5, ""),
        ("500 random ids with vocab_size 7", randint(7, 500, seed=101), 7,
         f"ids = {randint_call(7, 500, seed=101)}; vocab_size = 7"),
    ]:
        ids = torch.as_tensor(ids, dtype=torch.long)
        cases.append(Case(description, (ids.clone(), vocab_size), _reference_counts(ids, vocab_size),
                          compare=_compare_counts, rebuild=rebuild,
                          hint="pair every id with the one after it: ids[:-1] and ids[1:]"))
    run_cases("check_bigram_counts", fn, cases)


# -----------------------------------------------------------------------------
# exercise: cross-entropy from logits


def check_cross_entropy(fn) -> None:
    """Grade ``fn(logits, targets) -> mean negative log-likelihood`` against
    ``torch.nn.functional.cross_entropy``: ``logits`` has shape ``(N, V)``, ``targets`` shape
    ``(N,)``; the answer is one number (a float or a 0-d tensor), in nats."""
    __tracebackhide__ = True
    random_rebuild = (f"logits = 3 * {randn_call(40, 10, seed=102)}; "
                      f"targets = {randint_call(10, 40, seed=1102)}")
    cases_in = [
        ("2 positions, 3 classes, small logits",
         torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]), torch.tensor([0, 1]), ""),
        ("all-zero logits for 5 positions and 64 classes (a uniform model)",
         torch.zeros(5, 64), torch.tensor([0, 7, 63, 20, 5]),
         "with equal logits every class gets probability 1/64, so the loss is ln(64)"),
        ("40 positions, 10 classes, random logits",
         3 * randn(40, 10, seed=102), randint(10, 40, seed=1102), ""),
        ("a single position", torch.tensor([[0.3, -0.2, 1.5, 0.0]]), torch.tensor([3]), ""),
        ("large logits (1000 and more), where exp() overflows to inf",
         torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 999.0], [5000.0, 4999.0, 4998.0]]),
         torch.tensor([0, 2, 1]),
         "subtract each row's largest logit before exponentiating (the answer does not change), "
         "or use torch.logsumexp"),
        ("very negative logits (-1000 and less), where exp() underflows to 0",
         torch.tensor([[-1000.0, -1001.0, -1002.0], [-2000.0, -1990.0, -1995.0]]),
         torch.tensor([1, 0]),
         "subtract each row's largest logit before exponentiating, or use torch.logsumexp"),
    ]
    cases = []
    for description, logits, targets, hint in cases_in:
        expected = float(F.cross_entropy(logits.double(), targets))
        rebuild = random_rebuild if "random" in description else ""
        cases.append(Case(description, (logits.clone(), targets.clone()), expected, rebuild=rebuild,
                          compare=_compare_scalar(rtol=1e-4, atol=1e-4, not_finite=_OVERFLOW,
                                                  what="a single number (the mean over all positions)"),
                          hint=hint or "log-softmax each row over the classes (dim=-1), pick the "
                                       "target's entry, negate, average over positions"))
    run_cases("check_cross_entropy", fn, cases)


# -----------------------------------------------------------------------------
# exercise: sample from a bigram table


def check_sample_bigram(fn) -> None:
    """Grade ``fn(probs, start, num_tokens, generator) -> list of num_tokens ids``: each id is
    drawn from the row of ``probs`` of the id before it (the first from row ``start``), with
    ``torch.multinomial(..., generator=generator)`` or any sampler that uses ``generator``."""
    __tracebackhide__ = True

    cycle = torch.zeros(4, 4)
    cycle[0, 2] = cycle[2, 1] = cycle[1, 3] = cycle[3, 0] = 1.0      # 0 -> 2 -> 1 -> 3 -> 0
    transposed_path = [3, 1, 2, 0, 3, 1, 2, 0]     # what reading columns (probs[:, current]) gives

    def compare_cycle(got, expected) -> str | None:
        values, problem = _as_long_list(got, "the sample")
        if problem:
            return problem
        if len(values) != len(expected):
            return (f"asked for {len(expected)} new tokens, got {len(values)} (do not include the "
                    f"start token)")
        if values == expected:
            return None
        if values == transposed_path[:len(values)]:
            return (f"expected {expected}\n     got {values}\n  you seem to read a column instead of "
                    f"a row: the next token is drawn from probs[current], not probs[:, current]")
        return f"expected {expected}\n     got {values}"

    stochastic = torch.tensor([[0.0, 0.75, 0.25],
                               [0.5, 0.0, 0.5],
                               [1.0, 0.0, 0.0]])
    n_long = 6000

    def compare_frequencies(got, expected) -> str | None:
        values, problem = _as_long_list(got, "the sample")
        if problem:
            return problem
        if len(values) != n_long:
            return f"asked for {n_long} new tokens, got {len(values)}"
        if any(not 0 <= v < 3 for v in values):
            return f"token ids must lie in 0..2, got {sorted(set(values))}"
        seq = [0] + values
        counts = torch.zeros(3, 3)
        for a, b in zip(seq[:-1], seq[1:]):
            counts[a, b] += 1
        impossible = ((expected == 0) & (counts > 0)).nonzero()
        if len(impossible):
            a, b = impossible[0].tolist()
            return (f"your sample goes from {a} to {b} {int(counts[a, b])} times, but that step has "
                    f"probability 0 (is the table read as probs[current], row by row?)")
        freq = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        worst = (freq - expected).abs().max().item()
        if worst > 0.05:
            return (f"over {n_long} steps the frequencies of each next token should match the rows of "
                    f"the table within 0.05, but one is off by {worst:.2f}\n"
                    f"  table      {expected.tolist()}\n"
                    f"  your steps {[[round(x, 2) for x in row] for row in freq.tolist()]}\n"
                    f"  (taking the most likely token every time, with argmax, is not sampling)")
        return None

    def compare_repeatable(got, expected) -> str | None:
        values, problem = _as_long_list(got, "the sample")
        if problem:
            return problem
        try:
            again = fn(stochastic.clone(), 1, 50, generator(7))
        except Exception as err:            # keep the learner's traceback
            raise CheckFailed("check_sample_bigram: the second call with the same seed raised "
                              f"{type(err).__name__}: {err}") from err
        again, problem = _as_long_list(again, "the sample")
        if problem:
            return problem
        if values != again:
            return ("two calls with generators seeded the same way gave different samples: pass "
                    "generator=generator to torch.multinomial so results can be reproduced")
        return None

    cycle_table = ("probs = torch.zeros(4, 4); "
                   "probs[0, 2] = probs[2, 1] = probs[1, 3] = probs[3, 0] = 1.0")
    stochastic_table = "probs = torch.tensor([[0, .75, .25], [.5, 0, .5], [1, 0, 0]])"

    def call(table, start, num_tokens, seed):
        return (f"{table}; start, num_tokens = {start}, {num_tokens}; "
                f"generator = torch.Generator().manual_seed({seed})")

    cases = [
        Case("a table that always moves 0 -> 2 -> 1 -> 3 -> 0, start 0, 8 tokens",
             (cycle.clone(), 0, 8, generator(0)), [2, 1, 3, 0, 2, 1, 3, 0],
             compare=compare_cycle, rebuild=call(cycle_table, 0, 8, 0),
             hint="the next token is drawn from the row of the current one"),
        Case("the same table, asking for 0 tokens", (cycle.clone(), 3, 0, generator(0)),
             [], compare=compare_cycle, rebuild=call(cycle_table, 3, 0, 0),
             hint="asking for 0 tokens should return an empty list"),
        Case(f"{n_long} tokens from the table [[0, .75, .25], [.5, 0, .5], [1, 0, 0]], start 0",
             (stochastic.clone(), 0, n_long, generator(1)), stochastic,
             compare=compare_frequencies, rebuild=call(stochastic_table, 0, n_long, 1),
             hint="draw with torch.multinomial(probs[current], 1, generator=generator)"),
        Case("two calls with identically seeded generators",
             (stochastic.clone(), 1, 50, generator(7)), None,
             compare=compare_repeatable, rebuild=call(stochastic_table, 1, 50, 7),
             hint="use the generator you are given for every draw"),
    ]
    run_cases("check_sample_bigram", fn, cases)


# -----------------------------------------------------------------------------
# exercise: cut windows into inputs and targets


def check_make_batch(fn) -> None:
    """Grade ``fn(data, starts, block_size) -> (inputs, targets)``: for every start ``s`` in the
    1-D tensor ``starts``, ``inputs[b] = data[s : s + block_size]`` and ``targets[b]`` is the same
    window shifted one token to the right; both have shape ``(len(starts), block_size)``."""
    __tracebackhide__ = True
    ramp = torch.arange(100, 112)                   # values reveal positions: data[i] = 100 + i
    random_data = randint(50, 300, seed=104)
    random_starts = randint(300 - 16, 8, seed=1104)
    random_rebuild = (f"data = {randint_call(50, 300, seed=104)}; "
                      f"starts = {randint_call(300 - 16, 8, seed=1104)}; block_size = 16")

    def reference(data, starts, block_size):
        inputs = torch.stack([data[s:s + block_size] for s in starts.tolist()])
        targets = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
        return inputs, targets

    def compare(got, expected) -> str | None:
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return f"expected a pair (inputs, targets), got {_short(got)}"
        for name, g_t, e_t in zip(("inputs", "targets"), got, expected):
            if not isinstance(g_t, torch.Tensor):
                return f"expected {name} as a torch.Tensor, got {_short(g_t)}"
            if tuple(g_t.shape) != tuple(e_t.shape):
                extra = (" (rows are windows, columns are positions: (len(starts), block_size))"
                         if tuple(g_t.shape) == tuple(e_t.shape)[::-1] else "")
                return f"expected {name} of shape {tuple(e_t.shape)}, got shape {tuple(g_t.shape)}{extra}"
            if g_t.dtype.is_floating_point:
                return f"expected {name} to hold integer token ids, got dtype {g_t.dtype}"
        got_in, got_tg = (t.detach().cpu().long() for t in got)
        exp_in, exp_tg = expected
        if not torch.equal(got_in, exp_in):
            return f"the inputs are wrong\nexpected {_short(exp_in)}\n     got {_short(got_in)}"
        if torch.equal(got_tg, exp_in):
            return "the targets equal the inputs: each target must be the token AFTER its input"
        if not torch.equal(got_tg, exp_tg):
            return (f"the inputs are right but the targets are not: targets[b, t] must be "
                    f"data[starts[b] + t + 1]\nexpected {_short(exp_tg)}\n     got {_short(got_tg)}")
        return None

    cases = []
    for description, data, starts, block_size, rebuild in [
        ("data 100, 101, ..., 111 with starts [0, 3] and block_size 4", ramp, torch.tensor([0, 3]), 4,
         ""),
        ("the same data with starts [8] and block_size 3 (the window reaches the last token)",
         ramp, torch.tensor([8]), 3, ""),
        ("block_size 1", ramp, torch.tensor([5, 0, 10]), 1, ""),
        ("300 random ids, 8 random starts, block_size 16", random_data, random_starts, 16,
         random_rebuild),
    ]:
        cases.append(Case(description, (data.clone(), starts.clone(), block_size),
                          reference(data, starts, block_size), compare=compare, rebuild=rebuild,
                          hint="inputs: data[s : s + block_size]; targets: data[s + 1 : s + 1 + block_size]; "
                               "torch.stack the windows into rows"))
    run_cases("check_make_batch", fn, cases)


# -----------------------------------------------------------------------------
# exercise: a gradient by finite differences


def check_numerical_gradient(fn) -> None:
    """Grade ``fn(f, x, h=1e-6) -> tensor shaped like x``: the central difference
    ``(f(x + h e_k) - f(x - h e_k)) / (2 h)`` for every entry ``k`` of the float64 tensor ``x``,
    where ``f`` maps a tensor shaped like ``x`` to one number. The expected gradients are written
    out by hand (for the polynomials and the cross-entropy) or come from autograd (torch.autograd.grad)
    on the checker's own function; ``x`` must come back unchanged."""
    __tracebackhide__ = True
    f64 = torch.float64
    x_cube = randn(3, 4, seed=105, dtype=f64)
    x_ce = 2 * randn(4, 5, seed=106, dtype=f64)
    targets = torch.tensor([0, 3, 1, 4])
    x_mix = randn(2, 3, seed=107, dtype=f64)

    def cube(x):
        return (x ** 3).sum()

    def squares(x):
        return (x ** 2).sum()

    def ce(x):
        return F.cross_entropy(x, targets)

    def mix(x):
        return torch.sin(x[0, 0] * x[1, 2]) + (x.exp() * torch.arange(6.0, dtype=f64).view(2, 3)).sum()

    def autograd(f, x):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(x), x)
        return grad

    def rebuild(shape, seed, scale, f_text):
        dims = ", ".join(map(str, shape))
        return (f"x = {scale}torch.randn({dims}, generator=torch.Generator().manual_seed({seed}), "
                f"dtype=torch.float64); f = {f_text}")

    def with_x_after(f, x, **kwargs):           # the learner's answer, and x after the call
        before = x.clone()
        return fn(f, x, **kwargs), before, x

    def compare(got, expected) -> str | None:
        answer, before, after = got
        if not torch.equal(after, before):
            return ("your function changed the x it was given (largest change "
                    f"{(after - before).abs().max().item():.3g}). Nudge a copy (x.clone()), or save "
                    "each entry's value and assign it back after nudging it.")
        return close(answer, expected)

    central = ("use the central difference (f(x + h) - f(x - h)) / (2 h), nudging one entry at a "
               "time: the one-sided (f(x + h) - f(x)) / h is off by about h / 2 times the second "
               "derivative")
    close = compare_close(rtol=1e-6, atol=1e-5)
    ce_grad = torch.softmax(x_ce, dim=-1)
    ce_grad[torch.arange(4), targets] -= 1
    ce_grad /= 4
    cases = [
        Case("f = lambda x: (x ** 2).sum() at x = tensor([1., -2., 3.], dtype=torch.float64)",
             (squares, torch.tensor([1.0, -2.0, 3.0], dtype=f64)), torch.tensor([2.0, -4.0, 6.0], dtype=f64),
             compare=compare, hint="the gradient of the sum of squares is 2 x",
             rebuild="x = torch.tensor([1., -2., 3.], dtype=torch.float64); f = lambda x: (x ** 2).sum()"),
        Case("f = lambda x: (x ** 3).sum() at a random 3 x 4 x (its gradient is 3 x ** 2)",
             (cube, x_cube.clone()), 3 * x_cube ** 2, compare=compare,
             rebuild=rebuild((3, 4), 105, "", "lambda x: (x ** 3).sum()"),
             hint="x has two dimensions: loop over x.numel() entries, e.g. through x.view(-1) or "
                  "x.flatten(), and return a tensor of x's shape"),
        Case("the same f and x with h=1e-3 (a large step, where a one-sided difference is visibly off)",
             (cube, x_cube.clone()), 3 * x_cube ** 2, kwargs={"h": 1e-3}, compare=compare,
             rebuild=rebuild((3, 4), 105, "", "lambda x: (x ** 3).sum(); h = 1e-3"), hint=central),
        Case("f = cross-entropy of logits x (4 x 5) with targets [0, 3, 1, 4]; the gradient is "
             "(softmax(x) - one_hot(targets)) / 4",
             (ce, x_ce.clone()), ce_grad, compare=compare,
             rebuild=rebuild((4, 5), 106, "2 * ", "lambda x: F.cross_entropy(x, torch.tensor([0, 3, 1, 4]))"),
             hint="divide by 2 h: the two nudged points are 2 h apart"),
        Case("f = sin(x[0, 0] * x[1, 2]) + sum of exp(x) weighted 0..5, compared with autograd",
             (mix, x_mix.clone()), autograd(mix, x_mix), compare=compare,
             rebuild=rebuild((2, 3), 107, "", "lambda x: torch.sin(x[0, 0] * x[1, 2]) + (x.exp() * "
                                               "torch.arange(6.0, dtype=torch.float64).view(2, 3)).sum()"),
             hint="nudge exactly one entry per difference, and put it back before the next one"),
    ]
    run_cases("check_numerical_gradient", with_x_after, cases)
