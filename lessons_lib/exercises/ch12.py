"""Checkers for chapter 12's exercises (what emerges in small Transformers).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (the diagonal itself for the
previous token, the diagonal of the earlier occurrence instead of the token after it, a
scratchpad without the final answer, a mean over sequences of per-token accuracies).

The references are plain Python loops over lists, written independently of
:mod:`lessons_lib.emergence`.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, _short, compare_equal, generator, run_cases

__all__ = [
    "check_previous_token_score",
    "check_induction_score",
    "check_parity_scratchpad",
    "check_token_and_exact_match",
]


def _random_attention(n_heads: int, T: int, seed: int) -> torch.Tensor:
    """(n_heads, T, T) causal attention weights: rows of a softmax over random scores."""
    scores = 2 * torch.randn(n_heads, T, T, generator=generator(seed))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def _attention_call(n_heads: int, T: int, seed: int) -> str:
    return (f"s = 2 * torch.randn({n_heads}, {T}, {T}, generator=torch.Generator()"
            f".manual_seed({seed})); weights = s.masked_fill(~torch.ones({T}, {T}, "
            "dtype=torch.bool).tril(), float('-inf')).softmax(-1)")


def _diagonal_mean(weights: torch.Tensor, rows, offset: int) -> list[float]:
    """Per head, the mean of weights[h, t, t - offset] over the rows t."""
    w = weights.tolist()
    return [sum(w[h][t][t - offset] for t in rows) / len(rows) for h in range(len(w))]


def _per_head(slips=None, tol: float = 1e-5):
    """A (n_heads,) float tensor close to the expected list; ``slips(got)`` names a mistake."""
    def compare(got, expected) -> str | None:
        if not isinstance(got, torch.Tensor):
            return f"expected a torch.Tensor with one score per head, got {_short(got)}"
        if tuple(got.shape) != (len(expected),):
            return (f"expected shape ({len(expected)},), one score per head, got shape "
                    f"{tuple(got.shape)}")
        values = [float(v) for v in got.detach().tolist()]
        if all(math.isclose(a, b, rel_tol=tol, abs_tol=tol) for a, b in zip(values, expected)):
            return None
        message = (f"expected {[round(v, 4) for v in expected]}\n"
                   f"     got {[round(v, 4) for v in values]}")
        named = slips(values) if slips else None
        return f"{message}\n  {named}" if named else message
    return compare


def _near(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b))


# -----------------------------------------------------------------------------
# exercise 1: the previous-token score

def check_previous_token_score(fn) -> None:
    """``fn(weights)``: one sequence's attention weights (n_heads, T, T), rows = queries.
    Returns (n_heads,): for each head the mean, over the queries t = 1 .. T-1, of the weight
    that query t puts on key t - 1."""
    __tracebackhide__ = True
    cases = []
    shift = torch.zeros(1, 5, 5)
    shift[0, 0, 0] = 1.0
    for t in range(1, 5):
        shift[0, t, t - 1] = 1.0
    uniform = torch.ones(2, 4, 4).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    fixed = [(shift, "a perfect previous-token head (T = 5): its score is 1"),
             (uniform, "two heads spreading attention evenly over the past (T = 4)")]
    for seed, (h, T) in ((3, (4, 9)), (4, (2, 16))):
        fixed.append((_random_attention(h, T, seed), f"{h} random causal heads, T = {T} "
                                                      f"(seed {seed})"))
    for weights, description in fixed:
        H, T, _ = weights.shape
        expected = _diagonal_mean(weights, range(1, T), 1)
        with_first = [e * (T - 1) / T for e in expected]      # query 0 counted, as 0
        diagonal = _diagonal_mean(weights, range(T), 0)

        def slips(got, with_first=with_first, diagonal=diagonal):
            if _near(got, diagonal):
                return "that is the weight on the query's own position (t -> t); use t -> t - 1"
            if _near(got, with_first):
                return ("query 0 has no previous token: average over the T - 1 queries "
                        "t = 1 .. T-1, not over all T")
            return None
        rebuild = "" if "random" not in description else _attention_call(H, T, int(
            description.split("seed ")[1].rstrip(")")))
        cases.append(Case(description, (weights,), expected, compare=_per_head(slips),
                          rebuild=rebuild, hint="torch.diagonal(weights, offset=-1, "
                          "dim1=-2, dim2=-1) holds weights[..., t, t - 1] for t = 1 .. T-1"))
    run_cases("check_previous_token_score", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the induction score

def check_induction_score(fn) -> None:
    """``fn(weights, span)``: attention weights (n_heads, 2 * span, 2 * span) of one sequence
    made of ``span`` random tokens followed by the same ``span`` tokens again. Returns
    (n_heads,): for each head the mean, over the queries t = span .. 2*span - 1 of the second
    copy, of the weight on key t - span + 1 (the token after the earlier occurrence of token t)."""
    __tracebackhide__ = True
    cases = []
    span = 4
    perfect = torch.zeros(2, 2 * span, 2 * span)
    perfect[:, :span, 0] = 1.0
    for t in range(span, 2 * span):
        perfect[0, t, t - span + 1] = 1.0                   # head 0: a perfect induction head
        perfect[1, t, t - span + 1] = 0.5                   # head 1: half induction,
        perfect[1, t, t - span] = 0.3                       # some on the earlier occurrence
        perfect[1, t, t - 1] = 0.2                          # and some on the previous token
    fixed = [(perfect, span, "span 4: head 0 a perfect induction head (score 1), head 1 "
              "half of one (score 0.5)", "")]
    for seed, (h, s) in ((5, (3, 5)), (6, (4, 8))):
        fixed.append((_random_attention(h, 2 * s, seed), s,
                      f"{h} random causal heads, span {s} (seed {seed})",
                      _attention_call(h, 2 * s, seed) + f"; span = {s}"))
    for weights, s, description, rebuild in fixed:
        rows = range(s, 2 * s)
        expected = _diagonal_mean(weights, rows, s - 1)
        duplicate = _diagonal_mean(weights, rows, s)           # the earlier occurrence itself
        all_rows = _diagonal_mean(weights, range(s - 1, 2 * s), s - 1)
        prev = _diagonal_mean(weights, rows, 1)

        def slips(got, duplicate=duplicate, all_rows=all_rows, prev=prev):
            if _near(got, duplicate):
                return ("that is the weight on the earlier occurrence of the same token "
                        "(t - span); an induction head looks one further, at t - span + 1, "
                        "the token that came next")
            if _near(got, prev):
                return "that is the previous-token score (t -> t - 1)"
            if _near(got, all_rows):
                return "count only the queries of the second copy, t = span .. 2*span - 1"
            return None
        cases.append(Case(description, (weights, s), expected, compare=_per_head(slips),
                          rebuild=rebuild,
                          hint="torch.diagonal(weights, offset=-(span - 1), dim1=-2, dim2=-1) "
                               "holds weights[..., t, t - span + 1]; keep its last span entries"))
    run_cases("check_induction_score", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: a parity scratchpad

def _scratchpad_reference(bits: str) -> str:
    out, running = [], 0
    for b in bits:
        running ^= int(b)
        out.append(b + str(running))
    return "".join(out) + "=" + str(running)


def check_parity_scratchpad(fn) -> None:
    """``fn(bits)``: a string of "0" and "1". Returns the training text with a scratchpad of
    running parities: each bit followed by the parity of the bits so far, then "=" and the
    parity of the whole string. ``"1101"`` -> ``"11100011=1"``."""
    __tracebackhide__ = True
    cases = []
    examples = ["1101", "0", "1", "0000", "1111", "10101", "011011100101"]
    seed = 8
    bits = torch.randint(2, (23,), generator=generator(seed)).tolist()
    examples.append("".join(str(b) for b in bits))
    for s in examples:
        expected = _scratchpad_reference(s)
        direct = s + "=" + expected[-1]
        no_answer = expected[:-2]
        flipped = "".join(c if i % 2 == 0 else str(1 - int(c)) for i, c in enumerate(no_answer))

        def compare(got, expected, direct=direct, no_answer=no_answer, flipped=flipped):
            problem = compare_equal(got, expected)
            if problem is None or not isinstance(got, str):
                return problem
            if got == direct:
                return problem + "\n  that is the direct answer; write the running parity after each bit"
            if got == no_answer:
                return problem + "\n  the scratchpad is right; end it with \"=\" and the answer"
            if got == flipped + expected[-2:] or got == flipped:
                return problem + "\n  the running parities are flipped: the parity of '1' is 1"
            return problem
        cases.append(Case(f"the bit string {s!r}", (s,), expected, compare=compare,
                          hint="keep a running parity p = 0; for each bit b, p = p ^ int(b)"))
    run_cases("check_parity_scratchpad", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: per-token accuracy and exact match

def _scores_reference(predictions, targets) -> tuple[float, float]:
    p, t = predictions.tolist(), targets.tolist()
    right = total = whole = 0
    for row_p, row_t in zip(p, t):
        ok = True
        for a, b in zip(row_p, row_t):
            if b == -100:
                continue
            total += 1
            right += a == b
            ok = ok and a == b
        whole += ok
    return right / total, whole / len(t)


def _pair_close(slips=None):
    def compare(got, expected) -> str | None:
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            return f"expected a pair (per_token, exact_match), got {_short(got)}"
        values = []
        for name, v in zip(("per_token", "exact_match"), got):
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    return f"{name} should be one number, got a tensor of shape {tuple(v.shape)}"
                v = v.item()
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                return f"{name} should be a number, got {_short(v)}"
        if _near(values, list(expected), 1e-6):
            return None
        message = (f"expected per_token {expected[0]:.4f}, exact_match {expected[1]:.4f}\n"
                   f"     got per_token {values[0]:.4f}, exact_match {values[1]:.4f}")
        named = slips(values) if slips else None
        return f"{message}\n  {named}" if named else message
    return compare


def check_token_and_exact_match(fn) -> None:
    """``fn(predictions, targets)``: (batch, T) predicted and true token ids, -100 in
    ``targets`` marking positions that are not scored. Returns ``(per_token, exact_match)``:
    the share of scored tokens predicted right, and the share of sequences whose scored tokens
    are all right."""
    __tracebackhide__ = True
    cases = []
    small_p = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 4], [5, 5, 5, 5]])
    small_t = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [-100, -100, 5, 0]])
    fixed = [(small_p, small_t, "three sequences, the last with two unscored positions", "")]
    g = generator(9)
    targets = torch.randint(3, (40, 12), generator=g)
    predictions = torch.where(torch.rand(40, 12, generator=g) < 0.85, targets,
                              torch.randint(3, (40, 12), generator=g))
    lengths = torch.randint(2, 13, (40,), generator=g)
    targets = torch.where(torch.arange(12) < lengths[:, None], targets, torch.full_like(targets, -100))
    fixed.append((predictions, targets, "40 sequences of 2 to 12 scored tokens, padded with "
                  "-100 (seeded)",
                  "g = torch.Generator().manual_seed(9); t = torch.randint(3, (40, 12), "
                  "generator=g); p = torch.where(torch.rand(40, 12, generator=g) < 0.85, t, "
                  "torch.randint(3, (40, 12), generator=g)); n = torch.randint(2, 13, (40,), "
                  "generator=g); targets = torch.where(torch.arange(12) < n[:, None], t, -100)"))
    for p, t, description, rebuild in fixed:
        expected = _scores_reference(p, t)
        scored = t != -100
        with_pad = ((p == t) | ~scored).float().mean().item()
        ignored_pad = (p == t).float().mean().item()
        per_seq = (((p == t) & scored).sum(1).float() / scored.sum(1)).mean().item()

        def slips(got, with_pad=with_pad, ignored_pad=ignored_pad, per_seq=per_seq,
                  expected=expected):
            if math.isclose(got[0], with_pad, abs_tol=1e-6) or \
                    math.isclose(got[0], ignored_pad, abs_tol=1e-6):
                return "per_token counted the -100 positions; score only the targets"
            if math.isclose(got[0], per_seq, abs_tol=1e-6) and \
                    not math.isclose(per_seq, expected[0], abs_tol=1e-6):
                return ("per_token is a mean of per-sequence accuracies; count every scored "
                        "token once: right tokens / scored tokens")
            if math.isclose(got[1], expected[0], abs_tol=1e-6):
                return "exact_match came out as the per-token accuracy"
            return None
        cases.append(Case(description, (p, t), expected, compare=_pair_close(slips),
                          rebuild=rebuild,
                          hint="scored = targets != -100; right = (predictions == targets) "
                               "& scored; a sequence is exact when right == scored everywhere"))
    run_cases("check_token_and_exact_match", fn, cases)
