"""Measuring a policy, and the other way to optimise a reward: sampling more.

:func:`evaluate_policy` (mean reward by each judge, KL to the reference, distinct-2, ended
responses, on fresh samples); :func:`best_of_n_kl` and :func:`best_of_n` (pick the best of
``n`` samples by one reward; what the pick scores by others); :func:`pass_at_k` (Chen et
al.'s unbiased estimator) and :func:`mean_pass_at_k` for checked answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import eval_mode, finite, float_tensor, is_int, non_negative_int, shape_of
from ..checks import token_ids
from ..model import num_parameters
from ..runtime import threads_for, use_threads
from ..scoring import sequence_logprobs
from .rollouts import Rollout, distinct_n, language_model, rollout, score
from .trainer import check_policy

__all__ = ["PolicyEvaluation", "evaluate_policy", "best_of_n_kl", "BestOfN", "best_of_n",
           "pass_at_k", "mean_pass_at_k"]


@dataclass
class PolicyEvaluation:
    """A policy measured on fresh samples (one per prompt given)."""

    rewards: dict[str, float]        # the mean score of the samples, by each reward function
    kl: float                        # mean over samples of log p_policy - log p_ref (summed)
    distinct_2: float                # distinct bigrams / all bigrams of the responses
    ended: float                     # share of responses that end with the end-of-text token
    response_length: float           # mean tokens per response, end-of-text included
    scores: dict[str, torch.Tensor]  # (n,) each sample's score, by each reward function
    samples: Rollout                 # the samples themselves (sequences, mask)


def _reward_fns(reward_fns) -> dict:
    if callable(reward_fns):
        return {"reward": reward_fns}
    if isinstance(reward_fns, dict) and reward_fns and all(callable(f) for f in
                                                           reward_fns.values()):
        return dict(reward_fns)
    raise ValueError("reward_fns must be a reward function (Rollout -> scores), or a "
                     "non-empty dict of them by name")


def evaluate_policy(policy, reference, reward_fns, prompts: torch.Tensor,
                    max_new_tokens: int, eot_id: int | None = None, temperature: float = 1.0,
                    seed: int = 0) -> PolicyEvaluation:
    """Sample one response per row of ``prompts`` (N, P) with ``policy`` (a language model or
    a :class:`lessons_lib.rlhf.ppo.PolicyWithValue`), as PPO does, and measure the samples:
    their mean score by each of ``reward_fns`` (one function ``Rollout -> scores``, such as a
    :class:`lessons_lib.rlhf.reward_model.RewardModel`, or a dict of them by name), the KL to
    ``reference`` (the k1 estimate of :func:`lessons_lib.rlhf.ppo.kl_penalized_rewards`,
    summed over each response and averaged over the samples: an unbiased estimate of
    KL(policy || reference) in nats per response), distinct-2, the share that end by
    themselves and their mean length. Seeded, so two policies measured with one seed see the
    same prompts and random numbers."""
    reward_fns = _reward_fns(reward_fns)
    check_policy("reference", reference)
    token_ids(prompts, "prompts", shape="(N, P)")
    non_negative_int("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    threads = threads_for(num_parameters(reference))
    lm = language_model(policy)
    with use_threads(threads), eval_mode(reference):
        samples = rollout(policy, prompts, max_new_tokens, temperature, eot_id, generator)
        with torch.no_grad():
            if lm is reference:             # the reference itself: KL 0, one pass saved
                ref_logp = samples.logprobs
            else:
                ref_logp = sequence_logprobs(reference, samples.sequences,
                                             samples.response_mask, temperature)
            scores = {name: score(fn, samples).cpu() for name, fn in reward_fns.items()}
    kl = (samples.logprobs - ref_logp).sum(dim=1).mean().item()
    response = samples.sequences[:, samples.prompt_length:]
    ended = (response == eot_id).any(dim=1).float().mean().item() if eot_id is not None else 0.0
    return PolicyEvaluation(
        rewards={name: s.mean().item() for name, s in scores.items()}, kl=kl,
        distinct_2=distinct_n(samples.responses(), 2), ended=ended,
        response_length=samples.response_mask.sum(dim=1).float().mean().item(),
        scores=scores, samples=samples)


def best_of_n_kl(n) -> float:
    """``ln n - (n - 1) / n`` nats: the KL(best-of-n || base) of picking the best of ``n``
    independent samples by a score with no ties when no two samples can be equal (continuous
    outputs; Stiennon et al., 2020, appendix), and an upper bound on it for discrete outputs
    such as text, where a sample can repeat (Beirami et al., 2024). 0 for ``n = 1``."""
    if not (is_int(n) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


@dataclass
class BestOfN:
    """Best-of-n by one score, for each ``n``: what the picked sample scores, on average."""

    n: list[int]
    kl: list[float]                  # best_of_n_kl(n): the bound on the KL to the base model
    scores: dict[str, list[float]]   # by name: the mean score of the picked samples


def best_of_n(select: torch.Tensor, ns, **others: torch.Tensor) -> BestOfN:
    """Best-of-n sampling, estimated exactly from a pool of ``N`` samples per prompt.

    ``select`` (prompts, N) holds the score that picks: best-of-n keeps, of ``n`` samples,
    the one ``select`` ranks highest. ``others`` (each (prompts, N), by name) are other scores
    of the same samples (e.g. a gold reward). For each ``n`` in ``ns`` (1 .. N) this returns
    the expected score of the picked sample, averaged over the prompts, by ``select`` (as
    ``"select"``) and by each of ``others``: not one random draw of ``n`` samples but the
    average over every subset of ``n`` of the pool, an unbiased estimate. Sorted by
    ``select``, the ``i``-th lowest of ``N`` (``i = 1 .. N``) is the best of a random subset of
    ``n`` with probability ``C(i - 1, n - 1) / C(N, n)``."""
    float_tensor("select", select, ndim=2)
    finite("select", select)
    for name, other in others.items():
        float_tensor(name, other, ndim=2)
        finite(name, other)
        if other.shape != select.shape:
            raise ValueError(f"{name} must have the shape of select, {tuple(select.shape)}, "
                             f"got {tuple(other.shape)}")
    n_prompts, pool = select.shape
    ns = list(ns)
    if not ns or not all(is_int(n) and 1 <= n <= pool for n in ns):
        raise ValueError(f"ns must be ints in 1..{pool} (the samples per prompt), got {ns}")
    order = select.argsort(dim=1)                                   # ascending, per prompt
    ranked = {"select": select.gather(1, order).double()}
    ranked.update({name: other.gather(1, order).double() for name, other in others.items()})
    i = torch.arange(1, pool + 1, dtype=torch.float64)              # rank of each sorted sample
    scores = {name: [] for name in ranked}
    for n in ns:
        # log C(i - 1, n - 1) - log C(N, n); zero weight where i < n
        log_weight = (torch.lgamma(i) - torch.lgamma(torch.clamp(i - n + 1, min=1.0))
                      - math.lgamma(n) - (math.lgamma(pool + 1) - math.lgamma(n + 1)
                                          - math.lgamma(pool - n + 1)))
        weight = torch.where(i >= n, log_weight.exp(), 0.0)          # sums to 1
        for name, values in ranked.items():
            scores[name].append((values @ weight).mean().item())
    return BestOfN(ns, [best_of_n_kl(n) for n in ns], scores)

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et
    al., 2021): the probability that at least one of ``k`` samples drawn without replacement
    from the ``n`` is correct, ``1 - C(n - c, k) / C(n, k)``, computed as a product so that it
    stays exact for large ``n``."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in 0..n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n} (k samples out of n), got {k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):        # C(n-c, k) / C(n, k) = prod (1 - k / i)
        fail *= 1.0 - k / i
    return 1.0 - fail


def mean_pass_at_k(correct: torch.Tensor, k: int) -> float:
    """pass@k averaged over problems: ``correct`` (problems, n) bool holds ``n`` checked
    samples per problem; each row gives :func:`pass_at_k` ``(n, correct in the row, k)``."""
    if not isinstance(correct, torch.Tensor) or correct.dtype != torch.bool or correct.dim() != 2:
        raise ValueError(f"correct must be a (problems, n) bool tensor, got {shape_of(correct)}")
    n = correct.size(1)
    return sum(pass_at_k(n, c, k) for c in correct.sum(dim=1).tolist()) / len(correct)
