"""Checkers for chapter 11's exercises (DPO and GRPO).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (chosen and rejected swapped,
``beta`` or the reference left out, a mean over the whole batch where each group has its own,
each response averaged on its own, the mask ignored, the biased pass@k, a KL estimator with its
ratio upside down).

The references are written here with plain Python floats and loops, independently of
:mod:`lessons_lib.rlhf`: ``log(1 + exp(-m))`` evaluated stably for the DPO loss, each group's
mean and Bessel-corrected standard deviation summed out by hand, the clipped surrogate token by
token over the response tokens only, pass@k as an exact fraction of binomial coefficients, and
the three KL estimators from ``math.log`` and ``math.exp`` of one float at a time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ._core import Case, _short, compare_close, randn, randn_call, run_cases
from ._core import floats as _floats
from ._core import near as _near
from ._core import number_close as _number_close
from ._core import tensor_close

__all__ = [
    "check_dpo_loss",
    "check_group_advantages",
    "check_grpo_objective",
    "check_pass_at_k",
    "check_kl_estimators",
]



def _close(a: float, b: float, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


# -----------------------------------------------------------------------------
# exercise 1: the DPO loss

def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    rows = zip(_floats(policy_chosen), _floats(policy_rejected), _floats(ref_chosen),
               _floats(ref_rejected))
    return [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in rows]


def _dpo_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> float:
    margins = _dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return sum(_softplus(-m) for m in margins) / len(margins)        # -log sigmoid(m)


def _dpo_slips(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    margins = _dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    n = len(margins)
    swapped = sum(_softplus(m) for m in margins) / n
    summed = sum(_softplus(-m) for m in margins)
    without_beta = _dpo_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 1.0)
    zeros = torch.zeros(n, dtype=torch.float64)
    no_reference = _dpo_reference(policy_chosen, policy_rejected, zeros, zeros, beta)

    def slips(value: float) -> str | None:
        if _close(value, swapped):
            return ("that is the loss with the margin's sign flipped: chosen and rejected "
                    "swapped, or the log-ratios taken as ref - policy. The loss is "
                    "-log sigmoid(beta * ((policy_chosen - ref_chosen) - "
                    "(policy_rejected - ref_rejected))), small when the policy raised the "
                    "chosen response more than the rejected one")
        if beta != 1 and _close(value, without_beta):
            return ("beta is missing: multiply the difference of log-ratios by beta before "
                    "the log sigmoid")
        if _close(value, no_reference):
            return ("the reference is missing: DPO compares log-ratios, "
                    "policy_chosen - ref_chosen and policy_rejected - ref_rejected, not the "
                    "policy's log-probabilities alone")
        if n > 1 and _close(value, summed):
            return f"that is the sum over the {n} pairs; take the mean"
        return None
    return slips


_UNDERFLOW = ("log(sigmoid(x)) underflowed: in float32 sigmoid(x) is exactly 0 below about "
              "x = -104, and log(0) = -inf. torch.nn.functional.logsigmoid(x) computes "
              "log(sigmoid(x)) without underflow")


def check_dpo_loss(fn) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)``: four 1-D float
    tensors, one summed response log-probability per pair under the policy and under the
    reference, and a float. Returns the DPO loss, a single number: the mean over the pairs of
    ``-log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))``.
    """
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -25.0]),
         torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -25.0]), 0.1,
         "two pairs where the policy equals the reference (every margin is 0, the loss is "
         "log 2)"),
        (torch.tensor([-10.0, -40.0]), torch.tensor([-20.0, -35.0]),
         torch.tensor([-14.0, -38.0]), torch.tensor([-18.0, -36.0]), 0.0,
         "beta = 0 (every margin is 0, the loss is log 2)"),
        (torch.tensor([-8.0, -22.0, -14.0]), torch.tensor([-11.0, -20.0, -15.0]),
         torch.tensor([-9.0, -21.0, -16.0]), torch.tensor([-10.0, -23.0, -14.0]), 0.5,
         "three pairs, beta 0.5"),
        (torch.tensor([-250.0, -20.0]), torch.tensor([-10.0, -30.0]),
         torch.tensor([-100.0, -21.0]), torch.tensor([-160.0, -29.0]), 0.5,
         "a pair the policy ranks wrongly by a log-ratio margin of 300 (with beta 0.5, "
         "sigmoid(-150) underflows to 0 in float32)"),
    ]
    hint = ("torch.nn.functional.logsigmoid(x) is log(sigmoid(x)), computed without "
            "underflow")
    for pc, pr, rc, rr, beta, description in fixed:
        cases.append(Case(description, (pc, pr, rc, rr, beta),
                          _dpo_reference(pc, pr, rc, rr, beta),
                          compare=_number_close(rtol=1e-5, atol=1e-5,
                                                slips=_dpo_slips(pc, pr, rc, rr, beta),
                                                infinite=_UNDERFLOW),
                          hint=hint))
    for seed, beta in ((5, 0.1), (6, 0.5)):
        pc = -30 + 10 * randn(8, seed=seed)
        pr = -30 + 10 * randn(8, seed=seed + 1)
        rc = pc + randn(8, seed=seed + 2)
        rr = pr + randn(8, seed=seed + 3)
        cases.append(Case(f"8 random pairs (seed {seed}), beta {beta}", (pc, pr, rc, rr, beta),
                          _dpo_reference(pc, pr, rc, rr, beta),
                          compare=_number_close(rtol=1e-5, atol=1e-5,
                                                slips=_dpo_slips(pc, pr, rc, rr, beta),
                                                infinite=_UNDERFLOW),
                          rebuild=f"policy_chosen = -30 + 10 * {randn_call(8, seed=seed)}; "
                                  f"policy_rejected = -30 + 10 * {randn_call(8, seed=seed + 1)}; "
                                  f"ref_chosen = policy_chosen + {randn_call(8, seed=seed + 2)}; "
                                  f"ref_rejected = policy_rejected + "
                                  f"{randn_call(8, seed=seed + 3)}; beta = {beta}"))
    run_cases("check_dpo_loss", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: group-relative advantages

EPS = 1e-4


def _mean_std(values: list[float], bessel: bool = True) -> tuple[float, float]:
    mean = sum(values) / len(values)
    squares = sum((v - mean) ** 2 for v in values)
    return mean, math.sqrt(squares / (len(values) - 1 if bessel else len(values)))


def _advantages(groups: list[list[float]], bessel: bool = True, eps: float | None = EPS,
                scale: bool = True) -> list[float]:
    """Each group's values minus its mean, over its std + eps (``eps=None``: over its std,
    0 where the std is 0; ``scale=False``: not divided)."""
    out = []
    for values in groups:
        mean, std = _mean_std(values, bessel)
        for v in values:
            if not scale:
                out.append(v - mean)
            elif eps is None:
                out.append((v - mean) / std if std > 0 else 0.0)
            else:
                out.append((v - mean) / (std + eps))
    return out


def _group_reference(rewards, group_size: int) -> torch.Tensor:
    r = _floats(rewards)
    groups = [r[i:i + group_size] for i in range(0, len(r), group_size)]
    return torch.tensor(_advantages(groups), dtype=torch.float64)


def _group_slips(rewards, group_size):
    r = _floats(rewards)
    B = len(r)
    n_groups = B // group_size
    groups = [r[i:i + group_size] for i in range(0, B, group_size)]
    whole_batch = _advantages([r])
    mean_all = sum(r) / B
    batch_mean_only = []
    for values in groups:
        _, std = _mean_std(values)
        batch_mean_only += [(v - mean_all) / (std + EPS) for v in values]
    population = _advantages(groups, bessel=False)
    unscaled = _advantages(groups, scale=False)
    no_eps = _advantages(groups, eps=None)
    # rewards.view(group_size, -1): rows of B / group_size consecutive rewards, or (averaged
    # over dim 0) the strided groups r[j], r[j + n_groups], r[j + 2 * n_groups], ...
    rows = _advantages([r[i:i + n_groups] for i in range(0, B, n_groups)])
    strided = [0.0] * B
    for j in range(n_groups):
        column = _advantages([r[j::n_groups]])
        for k, value in enumerate(column):
            strided[j + k * n_groups] = value

    def slips(got: torch.Tensor) -> str | None:
        got = _floats(got)
        if any(math.isnan(v) for v in got):
            return None
        if n_groups > 1 and (_near(got, whole_batch) or _near(got, batch_mean_only)):
            return ("that uses the mean of the whole batch; each group of group_size "
                    "responses (to one prompt) has its own mean and std")
        if _near(got, population):
            return ("that divides by the population std (unbiased=False); the exercise uses "
                    "torch.std's default, the Bessel-corrected one (divide by group_size - 1)")
        if _near(got, unscaled):
            return "that is r - mean; divide it by the group's std + 1e-4"
        if _near(got, no_eps):
            return "the 1e-4 is missing: divide by (std + 1e-4)"
        if n_groups > 1 and n_groups != group_size and _near(got, rows):
            return ("those are groups of B // group_size rewards; rewards.view(-1, group_size) "
                    "gives one row per group of group_size consecutive rewards")
        if n_groups > 1 and _near(got, strided):
            return ("the groups were read strided (rewards.view(group_size, -1) reduced over "
                    "dim 0 takes rewards group_size apart); the groups are consecutive: "
                    "rewards.view(-1, group_size), one row per group")
        return None
    return slips


def _group_compare(slips):
    close = compare_close(rtol=2e-5, atol=1e-5)

    def compare(got, expected) -> str | None:
        if isinstance(got, torch.Tensor) and got.shape == expected.shape \
                and got.is_floating_point() and torch.isnan(got).any():
            return (f"got nan: {_short(got)}\n  a group whose rewards are all equal has "
                    "std 0, and 0 / 0 is nan; dividing by (std + 1e-4) gives 0 there")
        problem = close(got, expected)
        if problem is None or not isinstance(got, torch.Tensor) \
                or got.shape != expected.shape:
            return problem
        named = slips(got.detach().double())
        return f"{problem}\n  {named}" if named else problem
    return compare


def check_group_advantages(fn) -> None:
    """``fn(rewards, group_size)``: ``rewards`` (B,) float holds ``B // group_size`` groups of
    ``group_size`` consecutive rewards (the samples for one prompt each). Returns the (B,)
    advantages: each reward minus its group's mean, divided by the group's standard deviation
    (Bessel-corrected, torch.std's default) plus 1e-4."""
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4,
         "three groups of 4, two of them with every reward equal (all right, all wrong): "
         "their advantages are 0, not nan"),
        (torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 4,
         "three groups of 4 with 0/1 rewards (right or wrong)"),
        (torch.tensor([1.0, 0.0, 0.25, 0.75, 2.0, 2.0]), 2, "three groups of 2"),
        (torch.tensor([0.5, -1.0, 2.0, 0.5, 0.5, 0.5]), 3,
         "two groups of 3, the second with equal rewards"),
    ]
    for rewards, size, description in fixed:
        cases.append(Case(description, (rewards, size), _group_reference(rewards, size),
                          compare=_group_compare(_group_slips(rewards, size))))
    for seed, B, size in ((31, 32, 8), (32, 30, 5)):
        rewards = randn(B, seed=seed)
        cases.append(Case(f"{B // size} groups of {size} random rewards (seed {seed})",
                          (rewards, size), _group_reference(rewards, size),
                          compare=_group_compare(_group_slips(rewards, size)),
                          rebuild=f"rewards = {randn_call(B, seed=seed)}; group_size = {size}"))
    run_cases("check_group_advantages", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: GRPO's clipped objective over the response tokens

def _token_terms(new_logp, old_logp, advantages, mask, clip: float, pessimistic: bool = True,
                 clipped: bool = True) -> list[list[float]]:
    """Every position's loss term, row by row (masked or not)."""
    rows = []
    for new_row, old_row, a in zip(new_logp.tolist(), old_logp.tolist(), _floats(advantages)):
        row = []
        for new, old in zip(new_row, old_row):
            ratio = math.exp(new - old)
            if not clipped:
                row.append(-a * ratio)
                continue
            clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
            pick = max if pessimistic else min
            row.append(pick(-a * ratio, -a * clipped_ratio))
        rows.append(row)
    return rows


def _token_mean(terms, mask) -> float:
    kept = [t for row, m_row in zip(terms, mask.tolist()) for t, m in zip(row, m_row) if m]
    return sum(kept) / len(kept)


def _grpo_reference(new_logp, old_logp, advantages, mask, clip) -> float:
    return _token_mean(_token_terms(new_logp, old_logp, advantages, mask, clip), mask)


def _grpo_slips(new_logp, old_logp, advantages, mask, clip):
    terms = _token_terms(new_logp, old_logp, advantages, mask, clip)
    masks = mask.tolist()
    per_response = []
    for row, m_row in zip(terms, masks):
        kept = [t for t, m in zip(row, m_row) if m]
        per_response.append(sum(kept) / len(kept))
    sequence_level = sum(per_response) / len(per_response)
    every_position = sum(t for row in terms for t in row) / sum(len(row) for row in terms)
    masked_over_all = (sum(t for row, m_row in zip(terms, masks) for t, m in zip(row, m_row) if m)
                       / sum(len(row) for row in terms))
    optimistic = _token_mean(_token_terms(new_logp, old_logp, advantages, mask, clip,
                                          pessimistic=False), mask)
    unclipped = _token_mean(_token_terms(new_logp, old_logp, advantages, mask, clip,
                                         clipped=False), mask)
    objective = -_token_mean(terms, mask)

    def slips(value: float) -> str | None:
        if _close(value, objective):
            return ("that is the objective to maximise, min(A * ratio, A * clip(ratio)); "
                    "return the loss to minimise, its negative")
        if _close(value, sequence_level):
            return ("that averages each response over its own tokens, then over the "
                    "responses: the original GRPO's averaging (DeepSeekMath), in which a "
                    "long response's tokens count less. This exercise asks for token-level "
                    "averaging: the sum over every response token of the batch divided by "
                    "their number, mask.sum()")
        if _close(value, every_position):
            return ("the mask was ignored: padded positions (mask False) hold garbage "
                    "log-probabilities; average over the response tokens only")
        if _close(value, masked_over_all):
            return ("that divides by every position, B * T; divide by the number of response "
                    "tokens, mask.sum()")
        if _close(value, optimistic):
            return ("that takes the smaller of the two losses (the optimistic one); keep the "
                    "larger loss, max(-A * ratio, -A * clip(ratio)), so clipping never helps")
        if _close(value, unclipped):
            return "the ratio was not clipped to [1 - clip, 1 + clip]"
        return None
    return slips


def _lengths_mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T) < torch.tensor(lengths)[:, None]


def check_grpo_objective(fn) -> None:
    """``fn(new_logp, old_logp, advantages, mask, clip)``: ``new_logp`` and ``old_logp`` (B, T)
    float, ``advantages`` (B,) one per response, ``mask`` (B, T) bool, True on response tokens.
    Returns the loss to minimise: over every response token of the batch at once (token-level
    averaging), the mean of ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`` with
    ``ratio = exp(new_logp - old_logp)`` and ``A`` the token's response's advantage."""
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]]),
         torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -2.0, -4.0]]),
         torch.tensor([1.0, -0.5]), [3, 1], 0.2,
         "responses of 3 and 1 tokens, ratio 1 on every response token (padding holds "
         "garbage log-probabilities)"),
        (torch.tensor([[-0.5, -3.0], [-0.5, -3.0]]), torch.tensor([[-1.0, -2.0], [-1.0, -2.0]]),
         torch.tensor([1.0, -2.0]), [2, 2], 0.2,
         "two responses of 2 tokens, one ratio above 1 + clip and one below 1 - clip, with a "
         "positive and a negative advantage"),
        (torch.tensor([[-1.1, -0.9, -2.0, 5.0], [-0.7, -1.6, 3.0, 1.0], [-2.2, 0.5, 0.5, 0.5]]),
         torch.tensor([[-1.0, -1.0, -1.5, -3.0], [-1.0, -1.2, -2.0, -2.0],
                       [-2.0, -6.0, -6.0, -6.0]]),
         torch.tensor([2.0, -1.5, 0.5]), [3, 2, 1], 0.2,
         "responses of 3, 2 and 1 tokens, ratios inside and outside the clip range (padding "
         "holds garbage log-probabilities)"),
    ]
    hint = ("token-level averaging: (loss_per_token * mask).sum() / mask.sum(), with the "
            "advantages spread over the tokens as advantages[:, None]")
    for new, old, adv, lengths, clip, description in fixed:
        mask = _lengths_mask(lengths, new.shape[1])
        cases.append(Case(description, (new, old, adv, mask, clip),
                          _grpo_reference(new, old, adv, mask, clip),
                          compare=_number_close(slips=_grpo_slips(new, old, adv, mask, clip)),
                          hint=hint))
    for seed, lengths, T, clip in ((41, [6, 2, 4, 1], 6, 0.2), (42, [5, 3, 1], 5, 0.1)):
        B = len(lengths)
        old = -randn(B, T, seed=seed).abs()
        new = old + 0.3 * randn(B, T, seed=seed + 1)
        adv = randn(B, seed=seed + 2)
        mask = _lengths_mask(lengths, T)
        cases.append(Case(f"{B} responses of {lengths} tokens (seeded), clip {clip}",
                          (new, old, adv, mask, clip),
                          _grpo_reference(new, old, adv, mask, clip),
                          compare=_number_close(slips=_grpo_slips(new, old, adv, mask, clip)),
                          hint=hint,
                          rebuild=f"old_logp = -{randn_call(B, T, seed=seed)}.abs(); "
                                  f"new_logp = old_logp + 0.3 * {randn_call(B, T, seed=seed + 1)}; "
                                  f"advantages = {randn_call(B, seed=seed + 2)}; "
                                  f"mask = torch.arange({T}) < torch.tensor({lengths})[:, None]; "
                                  f"clip = {clip}"))
    run_cases("check_grpo_objective", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: the unbiased pass@k

def _pass_at_k_reference(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def _pass_at_k_slips(n, c, k):
    biased = 1 - (1 - c / n) ** k
    all_fail = float(Fraction(math.comb(n - c, k), math.comb(n, k)))
    all_right = float(Fraction(math.comb(c, k), math.comb(n, k)))

    def slips(value: float) -> str | None:
        if _close(value, biased, rtol=1e-9, atol=1e-12):
            return ("that is 1 - (1 - c/n)**k, which draws the k samples with replacement and "
                    "is biased; draw them without replacement from the n: "
                    "1 - C(n - c, k) / C(n, k)")
        if k > 1 and _close(value, c / n, rtol=1e-9, atol=1e-12):
            return "that is c / n, pass@1; pass@k grows with k: 1 - C(n - c, k) / C(n, k)"
        if k > 1 and _close(value, k * c / n, rtol=1e-9, atol=1e-12):
            return ("that is k * c / n, which counts the chances of several correct samples "
                    "more than once (and can pass 1); use 1 - C(n - c, k) / C(n, k)")
        if c >= k and _close(value, all_right, rtol=1e-9, atol=1e-12):
            return ("that is C(c, k) / C(n, k), the chance that all k samples are correct; "
                    "pass@k asks for at least one: 1 - C(n - c, k) / C(n, k)")
        if n - c >= k and _close(value, all_fail, rtol=1e-9, atol=1e-12):
            return ("that is C(n - c, k) / C(n, k), the chance that all k samples fail; "
                    "pass@k is one minus it")
        return None
    return slips


def check_pass_at_k(fn) -> None:
    """``fn(n, c, k)``: ``n`` samples of which ``c`` are correct, ``k <= n``. Returns the
    unbiased estimate of pass@k (Chen et al., 2021) as a float: the chance that at least one
    of ``k`` samples drawn without replacement from the ``n`` is correct,
    ``1 - C(n - c, k) / C(n, k)``."""
    __tracebackhide__ = True
    fixed = [
        (10, 6, 3, "n = 10, c = 6, k = 3"),
        (16, 3, 4, "n = 16, c = 3, k = 4"),
        (10, 3, 1, "k = 1 (pass@1 is c / n)"),
        (10, 0, 5, "c = 0: no correct sample, pass@k is 0"),
        (8, 8, 3, "c = n: every sample correct, pass@k is 1"),
        (10, 8, 5, "n - c < k: every draw of k holds a correct sample, pass@k is 1"),
        (5, 1, 5, "k = n: the draw is every sample"),
        (20, 5, 10, "n = 20, c = 5, k = 10"),
        (200, 7, 50, "n = 200, c = 7, k = 50 (200! does not fit in a float)"),
    ]
    cases = [Case(description, (n, c, k), _pass_at_k_reference(n, c, k),
                  compare=_number_close(rtol=1e-9, atol=1e-12,
                                        slips=_pass_at_k_slips(n, c, k)),
                  hint="math.comb(n, k) is the binomial coefficient C(n, k)")
             for n, c, k, description in fixed]
    run_cases("check_pass_at_k", fn, cases)


# -----------------------------------------------------------------------------
# exercise 5: three estimates of the KL from one sampled token

def _kl_reference(logp, ref_logp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k1, k2, k3 = [], [], []
    for lp, lq in zip(_floats(logp), _floats(ref_logp)):
        log_r = lq - lp                                  # log q(x) / p(x), x drawn from p
        k1.append(-log_r)
        k2.append(0.5 * log_r * log_r)
        k3.append(math.exp(log_r) - 1.0 - log_r)
    return tuple(torch.tensor(k, dtype=torch.float64) for k in (k1, k2, k3))


def _kl_slips(logp, ref_logp, which: int):
    log_r = torch.tensor(_floats(ref_logp), dtype=torch.float64) \
        - torch.tensor(_floats(logp), dtype=torch.float64)
    upside_down = [log_r, 0.5 * log_r.square(), (-log_r).exp() - 1.0 + log_r][which]
    no_half = log_r.square()

    def slips(got: torch.Tensor) -> str | None:
        if torch.allclose(got, upside_down, rtol=1e-4, atol=1e-5):
            return ("the ratio is upside down: r = q(x) / p(x) = exp(ref_logp - logp), the "
                    "reference over the policy that drew the token")
        if which == 1 and torch.allclose(got, no_half, rtol=1e-4, atol=1e-5):
            return "k2 is half the squared log-ratio: 0.5 * (log r) ** 2"
        return None
    return slips


def _kl_compare(logp, ref_logp):
    names = ("k1", "k2", "k3")

    def compare(got, expected) -> str | None:
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            return f"expected a tuple of three tensors (k1, k2, k3), got {_short(got)}"
        for which, (g, e) in enumerate(zip(got, expected)):
            problem = tensor_close(1e-4, 1e-5, slips=_kl_slips(logp, ref_logp, which))(
                g, e.to(g.dtype) if isinstance(g, torch.Tensor) else e)
            if problem:
                return f"{names[which]}: {problem}"
        return None
    return compare


def check_kl_estimators(fn) -> None:
    """``fn(logp, ref_logp)``: 1-D float tensors, the log-probabilities of sampled tokens
    under the policy ``p`` that drew them and under the reference ``q``. Returns the tuple
    ``(k1, k2, k3)`` of per-token estimates of KL(p || q), with ``log r = ref_logp - logp``:
    ``k1 = -log r``, ``k2 = (log r)^2 / 2`` and ``k3 = (r - 1) - log r``."""
    __tracebackhide__ = True
    fixed = [
        (torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -2.0, -0.5]),
         "the policy equals the reference: every estimate is 0"),
        (torch.tensor([-0.5, -3.0]), torch.tensor([-1.5, -1.0]),
         "one token the reference likes less (log r = -1) and one it likes more (log r = +2)"),
        (torch.tensor([-2.0, -0.1, -4.0, -1.0]), torch.tensor([-2.3, -0.2, -1.0, -0.7]),
         "four tokens, log-ratios from -0.3 to +3"),
    ]
    hint = ("log_r = ref_logp - logp; k1 = -log_r; k2 = 0.5 * log_r ** 2; "
            "k3 = torch.exp(log_r) - 1 - log_r")
    cases = [Case(description, (lp, lq), _kl_reference(lp, lq), compare=_kl_compare(lp, lq),
                  hint=hint)
             for lp, lq, description in fixed]
    for seed, n, spread in ((51, 50, 0.5), (53, 20, 3.0)):
        lp = -randn(n, seed=seed).abs()
        lq = lp + spread * randn(n, seed=seed + 1)
        cases.append(Case(f"{n} tokens (seeded), log-ratios of spread {spread}", (lp, lq),
                          _kl_reference(lp, lq), compare=_kl_compare(lp, lq), hint=hint,
                          rebuild=f"logp = -{randn_call(n, seed=seed)}.abs(); ref_logp = logp"
                                  f" + {spread} * {randn_call(n, seed=seed + 1)}"))
    run_cases("check_kl_estimators", fn, cases)
