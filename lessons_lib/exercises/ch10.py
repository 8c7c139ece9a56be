"""Checkers for chapter 10's exercises (a reward model and RLHF with PPO).

Each ``check_<name>(fn)`` runs the learner's ``fn`` on cases the learner does not see, compares
with an answer computed here, and on a wrong answer says which input failed, what was expected,
what came back and, where it can tell, which slip it looks like (a flipped sign, a sum where a
mean belongs, the score on every token, a loop that runs forwards, ``min`` for ``max``).

The references are written here with plain Python floats and loops, independently of
:mod:`lessons_lib.rlhf`: ``log(1 + exp(-m))`` evaluated stably for the Bradley-Terry loss, one
response at a time for the KL-penalised rewards, the backward recursion written out for GAE,
and the clipped surrogate token by token.
"""

from __future__ import annotations

import math

import torch

from ._core import Case, randn, randn_call, run_cases
from ._core import floats as _floats
from ._core import near as _near
from ._core import number_close as _number_close
from ._core import tensor_close as _tensor_close

__all__ = [
    "check_bradley_terry",
    "check_penalized_rewards",
    "check_gae_loop",
    "check_clipped_objective",
]


# -----------------------------------------------------------------------------
# exercise 1: the Bradley-Terry loss

def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _bt_reference(r_chosen, r_rejected) -> float:
    margins = [c - r for c, r in zip(_floats(r_chosen), _floats(r_rejected))]
    return sum(_softplus(-m) for m in margins) / len(margins)        # -log sigmoid(m)


def _bt_slips(r_chosen, r_rejected):
    margins = [c - r for c, r in zip(_floats(r_chosen), _floats(r_rejected))]
    flipped = sum(_softplus(m) for m in margins) / len(margins)
    summed = sum(_softplus(-m) for m in margins)
    no_log = sum(1 - 1 / (1 + math.exp(-max(min(m, 50), -50))) for m in margins) / len(margins)

    def slips(value: float) -> str | None:
        if math.isclose(value, flipped, rel_tol=1e-5, abs_tol=1e-6):
            return ("that is the loss with chosen and rejected swapped: the loss is "
                    "-log sigmoid(r_chosen - r_rejected), small when the chosen reward is higher")
        if len(margins) > 1 and math.isclose(value, summed, rel_tol=1e-5, abs_tol=1e-6):
            return f"that is the sum over the {len(margins)} pairs; take the mean"
        if math.isclose(value, no_log, rel_tol=1e-4, abs_tol=1e-6):
            return "that is 1 - sigmoid(margin); the loss takes the log: -log sigmoid(margin)"
        if value in (float("inf"), float("-inf")):
            return None
        return None
    return slips


def check_bradley_terry(fn) -> None:
    """``fn(r_chosen, r_rejected)`` (two 1-D float tensors, one reward each per pair) returns
    the Bradley-Terry loss: the mean over the pairs of ``-log sigmoid(r_chosen - r_rejected)``.
    """
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]),
         "three pairs with margins 2, 0 and -2"),
        (torch.tensor([0.5]), torch.tensor([0.5]),
         "one pair of equal rewards (the loss is log 2)"),
        (torch.tensor([-60.0, 3.0]), torch.tensor([60.0, 1.0]),
         "a pair ranked wrongly by a margin of 120 (log(sigmoid(-120)) underflows to -inf "
         "in float32; torch.nn.functional.logsigmoid does not)"),
    ]
    for chosen, rejected, description in fixed:
        cases.append(Case(description, (chosen, rejected), _bt_reference(chosen, rejected),
                          compare=_number_close(slips=_bt_slips(chosen, rejected)),
                          hint="torch.nn.functional.logsigmoid(x) is log(sigmoid(x)), "
                               "computed without underflow"))
    for seed in (3, 4):
        chosen, rejected = randn(16, seed=seed), randn(16, seed=seed + 100)
        cases.append(Case(f"16 random pairs (seed {seed})", (chosen, rejected),
                          _bt_reference(chosen, rejected),
                          compare=_number_close(slips=_bt_slips(chosen, rejected)),
                          rebuild=f"r_chosen = {randn_call(16, seed=seed)}; "
                                  f"r_rejected = {randn_call(16, seed=seed + 100)}"))
    run_cases("check_bradley_terry", fn, cases)


# -----------------------------------------------------------------------------
# exercise 2: the KL penalty folded into per-token rewards

def _penalized_reference(score: float, logp, ref_logp, kl_coef: float) -> torch.Tensor:
    logp, ref_logp = _floats(logp), _floats(ref_logp)
    rewards = [-kl_coef * (a - b) for a, b in zip(logp, ref_logp)]
    rewards[-1] += score
    return torch.tensor(rewards, dtype=torch.float64)


def _penalized_slips(score, logp, ref_logp, kl_coef):
    logp, ref_logp = _floats(logp), _floats(ref_logp)
    kl = [a - b for a, b in zip(logp, ref_logp)]
    T = len(kl)
    everywhere = [-kl_coef * k + score for k in kl]
    flipped = [kl_coef * k for k in kl]
    flipped[-1] += score
    first = [-kl_coef * k for k in kl]
    first[0] += score
    no_score = [-kl_coef * k for k in kl]

    def slips(got: torch.Tensor) -> str | None:
        got = _floats(got)
        if T > 1 and _near(got, everywhere):
            return ("the score went on every token; it judges the whole response, so it "
                    "goes on the last token only (every token gets -kl_coef * kl)")
        if _near(got, flipped):
            return ("the penalty has the wrong sign: a token the policy likes more than the "
                    "reference does (log p - log p_ref > 0) is penalised, -kl_coef * kl")
        if T > 1 and _near(got, first):
            return "the score went on the first token; it belongs on the last"
        if _near(got, no_score):
            return "the reward model's score is missing: add it to the last token's reward"
        return None
    return slips


def check_penalized_rewards(fn) -> None:
    """``fn(score, logp, ref_logp, kl_coef)``: one response of ``T`` tokens; ``score`` a float
    (the reward model's judgement of the whole response), ``logp`` and ``ref_logp`` (T,) the
    log-probabilities the policy and the reference give its tokens. Returns the (T,) rewards:
    ``-kl_coef * (logp - ref_logp)`` on every token, plus ``score`` on the last."""
    __tracebackhide__ = True
    cases = []
    fixed = [
        (2.0, torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -1.0]), 0.1,
         "three tokens, score 2.0, kl_coef 0.1"),
        (-1.0, torch.tensor([-3.0]), torch.tensor([-1.0]), 0.5,
         "a one-token response, kl_coef 0.5"),
        (0.7, torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -1.0]), 0.0,
         "kl_coef 0: only the score is left"),
    ]
    for score, logp, ref, coef, description in fixed:
        cases.append(Case(description, (score, logp, ref, coef),
                          _penalized_reference(score, logp, ref, coef),
                          compare=_tensor_close(slips=_penalized_slips(score, logp, ref, coef))))
    seed = 7
    logp, ref = -randn(12, seed=seed).abs(), -randn(12, seed=seed + 1).abs()
    cases.append(Case("twelve tokens (seeded), score 1.3, kl_coef 0.2", (1.3, logp, ref, 0.2),
                      _penalized_reference(1.3, logp, ref, 0.2),
                      compare=_tensor_close(slips=_penalized_slips(1.3, logp, ref, 0.2)),
                      rebuild=f"logp = -{randn_call(12, seed=seed)}.abs(); "
                              f"ref_logp = -{randn_call(12, seed=seed + 1)}.abs()"))
    run_cases("check_penalized_rewards", fn, cases)


# -----------------------------------------------------------------------------
# exercise 3: GAE by a backward loop

def _gae_reference(rewards, values, gamma: float, lam: float) -> torch.Tensor:
    r, v = _floats(rewards), _floats(values)
    T = len(r)
    advantages = [0.0] * T
    running = 0.0
    for t in range(T - 1, -1, -1):
        next_value = v[t + 1] if t + 1 < T else 0.0            # nothing after the response
        delta = r[t] + gamma * next_value - v[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return torch.tensor(advantages, dtype=torch.float64)


def _gae_slips(rewards, values, gamma, lam):
    r, v = _floats(rewards), _floats(values)
    T = len(r)
    deltas = [r[t] + gamma * (v[t + 1] if t + 1 < T else 0.0) - v[t] for t in range(T)]
    forward, running = [], 0.0
    for t in range(T):                                        # a loop in the wrong direction
        running = deltas[t] + gamma * lam * running
        forward.append(running)
    no_lambda, running = [0.0] * T, 0.0
    for t in range(T - 1, -1, -1):
        running = deltas[t] + gamma * running
        no_lambda[t] = running
    returns, running = [0.0] * T, 0.0
    for t in range(T - 1, -1, -1):
        running = r[t] + gamma * running
        returns[t] = running
    plus_v = [a + b for a, b in zip(_floats(_gae_reference(rewards, values, gamma, lam)), v)]

    def slips(got: torch.Tensor) -> str | None:
        got = _floats(got)
        if _near(got, deltas) and lam > 0:
            return ("those are the one-step errors delta_t; the advantage also adds "
                    "gamma * lam * A_{t+1}, accumulated from the end")
        if _near(got, forward):
            return ("the loop ran forwards; A_t depends on A_{t+1}, so start at the last "
                    "token and go backwards")
        if lam != 1 and _near(got, no_lambda):
            return "lam is missing: A_t = delta_t + gamma * lam * A_{t+1}"
        if _near(got, returns):
            return "those are the returns; subtract the values (the advantages are A = R - V)"
        if _near(got, plus_v):
            return "those are the returns A + V; the function returns the advantages A"
        return None
    return slips


def check_gae_loop(fn) -> None:
    """``fn(rewards, values, gamma, lam)``: one response's per-token rewards and values, (T,)
    each; the value after the last token is 0. Returns the (T,) advantages of GAE:
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``."""
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.2, 0.4, 0.8]), 1.0, 0.95,
         "three tokens, gamma 1, lam 0.95"),
        (torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.5, 0.5]), 1.0, 1.0,
         "three tokens, gamma = lam = 1 (then A_t is the reward still to come minus V_t)"),
        (torch.tensor([2.0]), torch.tensor([0.5]), 0.9, 0.8, "a one-token response"),
        (torch.tensor([-0.1, 0.3, -0.2, 1.5]), torch.tensor([0.1, -0.2, 0.4, 0.3]), 0.9, 0.0,
         "lam 0: each advantage is its one-step error"),
    ]
    for r, v, gamma, lam, description in fixed:
        cases.append(Case(description, (r, v, gamma, lam), _gae_reference(r, v, gamma, lam),
                          compare=_tensor_close(slips=_gae_slips(r, v, gamma, lam))))
    seed = 11
    r, v = randn(10, seed=seed), randn(10, seed=seed + 1)
    cases.append(Case("ten tokens (seeded), gamma 0.99, lam 0.9", (r, v, 0.99, 0.9),
                      _gae_reference(r, v, 0.99, 0.9),
                      compare=_tensor_close(slips=_gae_slips(r, v, 0.99, 0.9)),
                      rebuild=f"rewards = {randn_call(10, seed=seed)}; "
                              f"values = {randn_call(10, seed=seed + 1)}"))
    run_cases("check_gae_loop", fn, cases)


# -----------------------------------------------------------------------------
# exercise 4: PPO's clipped objective

def _clipped_reference(new_logp, old_logp, advantages, clip: float) -> float:
    losses = []
    for new, old, a in zip(_floats(new_logp), _floats(old_logp), _floats(advantages)):
        ratio = math.exp(new - old)
        clipped = min(max(ratio, 1 - clip), 1 + clip)
        losses.append(max(-a * ratio, -a * clipped))          # the pessimistic one
    return sum(losses) / len(losses)


def _clipped_slips(new_logp, old_logp, advantages, clip):
    rows = list(zip(_floats(new_logp), _floats(old_logp), _floats(advantages)))
    ratios = [math.exp(n - o) for n, o, _ in rows]
    clip_of = [min(max(q, 1 - clip), 1 + clip) for q in ratios]
    optimistic = sum(min(-a * q, -a * c) for (_, _, a), q, c in zip(rows, ratios, clip_of))
    unclipped = sum(-a * q for (_, _, a), q in zip(rows, ratios))
    plus_sign = sum(min(a * q, a * c) for (_, _, a), q, c in zip(rows, ratios, clip_of))
    n = len(rows)

    def slips(value: float) -> str | None:
        if math.isclose(value, optimistic / n, rel_tol=1e-5, abs_tol=1e-6):
            return ("that takes the smaller of the two losses (the optimistic one); PPO keeps "
                    "the larger loss, max(-A * ratio, -A * clip(ratio)), so clipping never helps")
        if math.isclose(value, unclipped / n, rel_tol=1e-5, abs_tol=1e-6):
            return "the ratio was not clipped to [1 - clip, 1 + clip]"
        if math.isclose(value, plus_sign / n, rel_tol=1e-5, abs_tol=1e-6):
            return ("that is the objective to maximise, min(A * ratio, A * clip(ratio)); "
                    "return the loss to minimise, its negative")
        return None
    return slips


def check_clipped_objective(fn) -> None:
    """``fn(new_logp, old_logp, advantages, clip)``, (T,) tensors each, returns PPO's clipped
    policy loss (to minimise): the mean over the tokens of
    ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`` with
    ``ratio = exp(new_logp - old_logp)``."""
    __tracebackhide__ = True
    cases = []
    fixed = [
        (torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([1.0, -0.5]),
         0.2, "ratio 1 everywhere: the loss is minus the mean advantage"),
        (torch.tensor([-0.5, -3.0]), torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 1.0]),
         0.2, "positive advantages, one ratio above 1 + clip and one below 1 - clip"),
        (torch.tensor([-0.5, -3.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]),
         0.2, "negative advantages, one ratio above 1 + clip and one below 1 - clip"),
        (torch.tensor([-1.1, -0.9]), torch.tensor([-1.0, -1.0]), torch.tensor([2.0, -2.0]),
         0.1, "ratios inside [1 - clip, 1 + clip]: nothing is clipped"),
    ]
    for new, old, adv, clip, description in fixed:
        cases.append(Case(description, (new, old, adv, clip),
                          _clipped_reference(new, old, adv, clip),
                          compare=_number_close(slips=_clipped_slips(new, old, adv, clip))))
    seed = 21
    old = -randn(32, seed=seed).abs()
    new = old + 0.3 * randn(32, seed=seed + 1)
    adv = randn(32, seed=seed + 2)
    cases.append(Case("32 tokens (seeded), clip 0.2", (new, old, adv, 0.2),
                      _clipped_reference(new, old, adv, 0.2),
                      compare=_number_close(slips=_clipped_slips(new, old, adv, 0.2)),
                      rebuild=f"old_logp = -{randn_call(32, seed=seed)}.abs(); "
                              f"new_logp = old_logp + 0.3 * {randn_call(32, seed=seed + 1)}; "
                              f"advantages = {randn_call(32, seed=seed + 2)}"))
    run_cases("check_clipped_objective", fn, cases)
