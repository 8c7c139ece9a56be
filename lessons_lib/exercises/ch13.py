"""Checkers for chapter 13's exercises (calibration, abstaining, ALiBi, RoPE).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (an unweighted mean over the
bins, a signed gap, a confidence of 1 left out; ``>`` for ``>=``, accuracy over every question;
a flipped sign or reversed slopes; the interleaved pair layout, a rotation the wrong way).

The references are written here with plain Python floats and loops, independently of
:mod:`lessons_lib.limitations` and :mod:`lessons_lib.attention`: the bins filled one answer at a
time, the ALiBi matrix entry by entry, and RoPE as a 2 x 2 rotation of each pair.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, as_number, generator, run_cases
from ._core import floats as _floats
from ._core import number_close as _number_close
from ._core import tensor_close as _tensor_close

__all__ = [
    "check_calibration_error",
    "check_coverage_at_threshold",
    "check_alibi_matrix",
    "check_rope_rotation",
]


# -----------------------------------------------------------------------------
# exercise 1: expected calibration error

def _bins(conf: list[float], n_bins: int, keep_ones: bool = True) -> list[list[int]]:
    """The indices in each bin [b/n, (b+1)/n); a confidence of exactly 1 joins the last bin."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(conf):
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            if lo <= c < hi or (keep_ones and b == n_bins - 1 and c == 1.0):
                bins[b].append(i)
                break
    return bins


def _ece(conf, correct, n_bins, weighted=True, absolute=True, keep_ones=True) -> float:
    conf, correct = _floats(conf), _floats(correct)
    total, full = 0.0, 0
    for idx in _bins(conf, n_bins, keep_ones):
        if not idx:
            continue
        full += 1
        gap = sum(correct[i] for i in idx) / len(idx) - sum(conf[i] for i in idx) / len(idx)
        gap = abs(gap) if absolute else gap
        total += (len(idx) / len(conf) if weighted else 1.0) * gap
    return total if weighted else total / full


def _ece_slips(conf, correct, n_bins):
    wrong = {
        "that is the plain mean of the bins' gaps; weight each bin by its share of the answers "
        "(its count / the number of answers)": _ece(conf, correct, n_bins, weighted=False),
        "the gaps cancel: take |accuracy - confidence| in each bin":
            _ece(conf, correct, n_bins, absolute=False),
        "the answers with confidence exactly 1.0 are missing: they belong in the last bin":
            _ece(conf, correct, n_bins, keep_ones=False),
    }

    def slips(value: float) -> str | None:
        for message, v in wrong.items():
            if math.isclose(value, v, rel_tol=1e-5, abs_tol=1e-6):
                return message
        return None
    return slips


def check_calibration_error(fn) -> None:
    """``fn(confidence, correct, n_bins)`` returns the expected calibration error: split [0, 1]
    into ``n_bins`` equal bins of confidence (bin b holds b/n <= c < (b+1)/n; a confidence of 1
    goes to the last bin) and sum over the non-empty bins (share of the answers in the bin) x
    |accuracy in the bin - mean confidence in the bin|. ``confidence`` is a 1-D float tensor,
    ``correct`` a 1-D bool tensor of the same length."""
    __tracebackhide__ = True
    fixed = [
        (torch.tensor([0.9, 0.9, 0.9, 0.9]), torch.tensor([False, False, False, True]), 10,
         "four answers at confidence 0.9, one right (ECE 0.65)"),
        (torch.tensor([0.15, 0.95, 0.95, 0.55]), torch.tensor([True, True, False, False]), 10,
         "four answers in three bins"),
        (torch.tensor([1.0, 1.0, 0.3, 0.35]), torch.tensor([True, False, False, False]), 5,
         "two answers with confidence exactly 1.0, 5 bins"),
        (torch.tensor([0.2, 0.8]), torch.tensor([True, False]), 1,
         "one bin: |overall accuracy - mean confidence|"),
    ]
    cases = [Case(d, (c, k, n), _ece(c, k, n), compare=_number_close(slips=_ece_slips(c, k, n)))
             for c, k, n, d in fixed]
    for seed in (1, 2):
        g = generator(seed)
        conf = torch.rand(200, generator=g) * 0.5 + 0.5
        conf[:3] = 1.0
        correct = torch.rand(200, generator=g) < conf - 0.2
        rebuild = (f"g = torch.Generator().manual_seed({seed}); "
                   "confidence = torch.rand(200, generator=g) * 0.5 + 0.5; confidence[:3] = 1.0; "
                   "correct = torch.rand(200, generator=g) < confidence - 0.2; n_bins = 10")
        cases.append(Case(f"200 random answers, overconfident (seed {seed}), 10 bins",
                          (conf, correct, 10), _ece(conf, correct, 10),
                          compare=_number_close(slips=_ece_slips(conf, correct, 10)),
                          rebuild=rebuild))
    run_cases("check_calibration_error", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: answer or abstain

def _coverage(conf, correct, threshold, strict=False, over_all=False):
    conf, correct = _floats(conf), _floats(correct)
    answered = [i for i, c in enumerate(conf) if (c > threshold if strict else c >= threshold)]
    coverage = len(answered) / len(conf)
    right = sum(correct[i] for i in answered)
    accuracy = right / (len(conf) if over_all else len(answered))
    return coverage, accuracy


def _pair_close(conf, correct, threshold):
    strict = _coverage(conf, correct, threshold, strict=True) if any(
        c == threshold for c in _floats(conf)) else None
    over_all = _coverage(conf, correct, threshold, over_all=True)

    def compare(got, expected) -> str | None:
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return f"expected a pair (coverage, accuracy), got {type(got).__name__}: {got!r}"
        values = []
        for part, name in zip(got, ("coverage", "accuracy")):
            v, problem = as_number(part, what=f"a number for the {name}")
            if problem:
                return problem
            values.append(v)
        if all(math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-7) for v, e in zip(values, expected)):
            return None
        message = f"expected (coverage, accuracy) = ({expected[0]:.6g}, {expected[1]:.6g}), " \
                  f"got ({values[0]:.6g}, {values[1]:.6g})"
        if strict and all(math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-7) for v, e in zip(values, strict)):
            return message + ": an answer whose confidence equals the threshold is answered (>=, not >)"
        if (math.isclose(values[0], expected[0], rel_tol=1e-6, abs_tol=1e-7)
                and math.isclose(values[1], over_all[1], rel_tol=1e-6, abs_tol=1e-7)):
            return message + (": that accuracy counts every question; divide the right answers "
                              "by the answers given, not by all questions")
        return message
    return compare


def check_coverage_at_threshold(fn) -> None:
    """``fn(confidence, correct, threshold)`` answers the questions whose confidence is at least
    ``threshold`` and abstains on the rest; it returns ``(coverage, accuracy)``: the share of
    the questions answered, and the share of the answers given that are right. At least one
    question is answered in every case."""
    __tracebackhide__ = True
    fixed = [
        (torch.tensor([0.2, 0.5, 0.9, 0.95]), torch.tensor([False, True, False, True]), 0.5,
         "four questions, threshold 0.5 (one answer sits exactly on it)"),
        (torch.tensor([0.2, 0.5, 0.9, 0.95]), torch.tensor([False, True, False, True]), 0.0,
         "threshold 0: answer everything"),
        (torch.tensor([0.6, 0.7, 0.99, 0.3, 0.999]), torch.tensor([True, False, True, False, True]),
         0.95, "five questions, threshold 0.95"),
    ]
    cases = [Case(d, (c, k, t), _coverage(c, k, t), compare=_pair_close(c, k, t))
             for c, k, t, d in fixed]
    g = generator(3)
    conf = torch.rand(100, generator=g)
    correct = torch.rand(100, generator=g) < conf
    cases.append(Case("100 random questions, threshold 0.8", (conf, correct, 0.8),
                      _coverage(conf, correct, 0.8), compare=_pair_close(conf, correct, 0.8),
                      rebuild="g = torch.Generator().manual_seed(3); "
                              "confidence = torch.rand(100, generator=g); "
                              "correct = torch.rand(100, generator=g) < confidence; threshold = 0.8"))
    run_cases("check_coverage_at_threshold", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: ALiBi's bias

def _slopes(n_heads: int) -> list[float]:
    return [2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)]


def _alibi(n_heads: int, T: int, slopes=None, sign: float = -1.0) -> torch.Tensor:
    slopes = slopes or _slopes(n_heads)
    return torch.tensor([[[sign * slopes[h] * (i - j) for j in range(T)] for i in range(T)]
                         for h in range(n_heads)], dtype=torch.float64)


def _alibi_slips(n_heads: int, T: int):
    wrong = {
        "the sign is flipped: a key further back must cost more, so the bias is "
        "-slope * (i - j), negative below the diagonal": _alibi(n_heads, T, sign=1.0),
        "the slopes are in reverse order: head 0 gets the steepest, 2^(-8/n_heads)":
            _alibi(n_heads, T, slopes=_slopes(n_heads)[::-1]),
        "the slopes are off by one head: head h gets 2^(-8 (h + 1) / n_heads), so head 0's is "
        "2^(-8/n_heads), not 1": _alibi(n_heads, T, slopes=[2.0 ** (-8.0 * h / n_heads)
                                                            for h in range(n_heads)]),
        "the future keys (j > i) must keep -slope * (i - j) (positive): the causal mask, "
        "not the bias, removes them": _alibi(n_heads, T).clamp(max=0),
    }

    def slips(got: torch.Tensor) -> str | None:
        for message, w in wrong.items():
            if torch.allclose(got, w, rtol=1e-5, atol=1e-6):
                return message
        if torch.allclose(got, -_alibi(n_heads, T).abs(), rtol=1e-5, atol=1e-6):
            return ("that is -slope * |i - j|: above the diagonal the bias is positive, "
                    "-slope * (i - j) with i < j")
        return None
    return slips


def check_alibi_matrix(fn) -> None:
    """``fn(n_heads, T)`` returns ALiBi's bias, a float tensor (n_heads, T, T): entry [h, i, j]
    is ``-m_h * (i - j)`` for a query at position i and a key at position j (every entry, also
    j > i: the causal mask removes those), with slopes ``m_h = 2 ** (-8 * (h + 1) / n_heads)``
    (``n_heads`` a power of two)."""
    __tracebackhide__ = True
    cases = []
    for n_heads, T, d in [(1, 3, "one head, 3 positions (slope 2^-8)"),
                          (2, 4, "2 heads, 4 positions (slopes 1/16 and 1/256)"),
                          (4, 5, "4 heads, 5 positions"), (8, 6, "8 heads, 6 positions")]:
        cases.append(Case(d, (n_heads, T), _alibi(n_heads, T),
                          compare=_tensor_close(slips=_alibi_slips(n_heads, T)),
                          hint="build the distance i - j as a (T, T) tensor from two aranges, then "
                               "multiply by the slopes viewed as (n_heads, 1, 1)"))
    run_cases("check_alibi_matrix", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: RoPE

def _rotate(x: torch.Tensor, positions: list[int], base: float, interleaved: bool = False,
            direction: float = 1.0, exponent: float = 2.0) -> torch.Tensor:
    """Turn each feature pair of each row by its position's angle, pair by pair."""
    T, d = x.shape
    rows = x.double().tolist()
    out = [[0.0] * d for _ in range(T)]
    for t in range(T):
        for i in range(d // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
            theta = direction * positions[t] * base ** (-exponent * i / d)
            c, s = math.cos(theta), math.sin(theta)
            out[t][a] = rows[t][a] * c - rows[t][b] * s
            out[t][b] = rows[t][a] * s + rows[t][b] * c
    return torch.tensor(out, dtype=torch.float64)


def _rope_slips(x, positions, base):
    wrong = {
        "that pairs neighbours (2i, 2i + 1); here pair i is features i and i + d/2 (the "
        "rotate_half layout of Llama and Hugging Face)": _rotate(x, positions, base, interleaved=True),
        "the rotation goes the wrong way: the first of a pair becomes a cos - b sin":
            _rotate(x, positions, base, direction=-1.0),
        "the frequencies are off: pair i turns by position * base^(-2i/d)":
            _rotate(x, positions, base, exponent=1.0),
    }

    def slips(got: torch.Tensor) -> str | None:
        for message, w in wrong.items():
            if torch.allclose(got, w, rtol=1e-4, atol=1e-5):
                return message
        return None
    return slips


def check_rope_rotation(fn) -> None:
    """``fn(x, positions, base)``: ``x`` (T, d) float, ``positions`` a list of T ints. Pair i
    is features ``i`` and ``i + d/2``; at position p it turns by the angle
    ``p * base ** (-2 * i / d)``: (a, b) -> (a cos - b sin, a sin + b cos). Return the turned
    (T, d) tensor."""
    __tracebackhide__ = True
    cases = []
    x1 = torch.tensor([[1.0, 0.0]])
    cases.append(Case("one pair (1, 0) at position 1, base 10000 (a turn by 1 radian)",
                      (x1, [1], 10000.0), _rotate(x1, [1], 10000.0),
                      compare=_tensor_close(slips=_rope_slips(x1, [1], 10000.0))))
    x0 = torch.tensor([[0.5, -1.0, 2.0, 3.0]])
    cases.append(Case("position 0: nothing turns", (x0, [0], 10000.0), _rotate(x0, [0], 10000.0),
                      compare=_tensor_close()))
    for seed, (T, d, base) in enumerate([(3, 4, 10000.0), (5, 8, 100.0), (4, 16, 10000.0)], 1):
        x = torch.randn(T, d, generator=generator(seed))
        positions = [3 * t + seed for t in range(T)]
        cases.append(Case(f"{T} positions {positions}, d = {d}, base {base:g}",
                          (x, positions, base), _rotate(x, positions, base),
                          compare=_tensor_close(slips=_rope_slips(x, positions, base)),
                          rebuild=f"x = torch.randn({T}, {d}, generator=torch.Generator()"
                                  f".manual_seed({seed})); positions = {positions}; base = {base}",
                          hint="angles: positions as a column (T, 1) times base^(-2i/d) for "
                               "i = 0..d/2-1; then cos and sin of the two halves"))
    run_cases("check_rope_rotation", fn, cases)
