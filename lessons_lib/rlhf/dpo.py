"""DPO (Rafailov et al., 2023; chapter 11): the preference loss on log-probability ratios to
a frozen reference, with no reward model and no sampling in the loop. Read top to bottom.

:func:`dpo_loss`; pairs from token lists (:func:`lessons_lib.scoring.encode_responses`) or
from groups of samples (:func:`best_and_worst`); :class:`DPOConfig`, :func:`train_dpo` and
:func:`dpo_implicit_accuracy` on held-out pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import finite, float_tensor, number_in, positive_int
from ..checks import positive_number, same_shape, token_ids
from ..model import num_parameters
from ..runtime import model_device, threads_for, use_threads
from ..scoring import check_response_mask, response_logprobs, sequence_logprobs
from .reward_model import pair_accuracy
from .rollouts import check_groups
from .trainer import History, Trainer, check_policy_and_reference, check_run_fields

__all__ = ["dpo_loss", "best_and_worst", "DPOConfig", "DPOHistory", "train_dpo",
           "dpo_implicit_accuracy"]


def _check_logps(**logps: torch.Tensor) -> None:
    for name, t in logps.items():
        float_tensor(name, t, ndim=1)
        finite(name, t)
    same_shape(**logps)
    if next(iter(logps.values())).numel() == 0:
        raise ValueError("got no pairs: the log-probability tensors are empty")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023), averaged over the pairs.

    Each argument is (pairs,): a response's log-probability summed over its response tokens
    only (:func:`lessons_lib.scoring.sequence_logprobs` ``.sum(1)``), under the policy or the
    frozen reference. The implicit reward of a response is
    ``beta * (log pi(y|x) - log pi_ref(y|x))``, and the loss is the Bradley-Terry negative
    log-likelihood of the preferences under that reward:
    ``-log sigmoid(r(chosen) - r(rejected))``. ``beta = 0``, or equal log-ratios, gives ln 2.

    Returns ``(loss, chosen_rewards, rejected_rewards)``; the rewards are detached.
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps,
                 policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = number_in("beta", beta, 0.0, math.inf, high_open=True)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def best_and_worst(scores: torch.Tensor, group_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference pairs from groups of samples: ``scores`` (B,) holds ``B / group_size``
    groups one after the other (samples of one prompt, as :func:`group_advantages` reads
    them). Returns the rows ``(chosen (n,), rejected (n,))`` of each group's best and worst
    sample, leaving out groups whose scores are all equal (no preference)."""
    groups = check_groups(scores, group_size)
    best, worst = groups.argmax(dim=1), groups.argmin(dim=1)
    keep = groups.max(dim=1).values > groups.min(dim=1).values
    start = torch.arange(len(groups), device=groups.device) * group_size
    return (start + best)[keep], (start + worst)[keep]


@dataclass
class DPOConfig:
    beta: float = 0.1                # strength of the implicit KL: the reward is beta * log-ratio
    lr: float = 5e-5
    epochs: int = 6                  # passes over the pairs
    batch_size: int = 32             # pairs per optimizer step
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            positive_int(f"DPOConfig.{name}", getattr(self, name))
        positive_number("DPOConfig.beta", self.beta)
        check_run_fields(self)


@dataclass
class DPOHistory(History):
    """One entry per optimizer step, over the step's pairs; rewards are DPO's implicit ones,
    ``beta * (log pi - log pi_ref)`` of a whole response."""

    loss: list[float] = field(default_factory=list)
    chosen_reward: list[float] = field(default_factory=list)
    rejected_reward: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)          # chosen minus rejected
    accuracy: list[float] = field(default_factory=list)        # share with a positive margin


def _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask) -> int:
    for name, idx, mask in (("chosen", chosen_idx, chosen_mask),
                            ("rejected", rejected_idx, rejected_mask)):
        token_ids(idx, f"{name}_idx", shape="(pairs, L)")
        check_response_mask(mask, idx.shape)
        if mask[:, 0].any():
            raise ValueError(f"{name}_mask[:, 0] must be False: the first token is the prompt's")
    if len(chosen_idx) != len(rejected_idx) or len(chosen_idx) == 0:
        raise ValueError(f"chosen and rejected must hold one row per pair, got "
                         f"{len(chosen_idx)} and {len(rejected_idx)} rows")
    return len(chosen_idx)


def train_dpo(policy: nn.Module, reference: nn.Module, chosen_idx: torch.Tensor,
              chosen_mask: torch.Tensor,
              rejected_idx: torch.Tensor, rejected_mask: torch.Tensor,
              config: DPOConfig | None = None) -> DPOHistory:
    """Optimise ``policy`` in place with :func:`dpo_loss` on fixed preference pairs.

    Row ``i`` of ``chosen_idx`` (pairs, L) and of ``rejected_idx`` (pairs, L') is a prompt and
    the preferred (resp. the other) response; the masks mark the response tokens (a
    :class:`Rollout`'s ``response_mask``, or :func:`lessons_lib.scoring.encode_responses`). The
    reference's log-probabilities are computed once, before training, without gradients: it
    never moves. Each epoch visits the pairs in a new random order, ``config.batch_size`` per
    Adam step. Dropout is off throughout, as in :func:`train_ppo`.
    """
    config = config or DPOConfig()
    check_policy_and_reference(policy, reference)
    n_pairs = _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask)
    device = model_device(policy)
    steps = config.epochs * math.ceil(n_pairs / config.batch_size)
    trainer = Trainer.for_config(policy, config, total=steps, desc="DPO")
    history = DPOHistory()
    with trainer.running(history):
        ref_chosen = response_logprobs(reference, chosen_idx, chosen_mask)
        ref_rejected = response_logprobs(reference, rejected_idx, rejected_mask)
        for _ in range(config.epochs):
            order = torch.randperm(n_pairs, generator=trainer.generator)
            for rows in order.split(config.batch_size):
                policy_chosen = sequence_logprobs(policy, chosen_idx[rows].to(device),
                                                  chosen_mask[rows].to(device)).sum(dim=1)
                policy_rejected = sequence_logprobs(policy, rejected_idx[rows].to(device),
                                                    rejected_mask[rows].to(device)).sum(dim=1)
                loss, chosen_reward, rejected_reward = dpo_loss(
                    policy_chosen, policy_rejected, ref_chosen[rows].to(device),
                    ref_rejected[rows].to(device), config.beta)
                trainer.step(loss)
                margin = chosen_reward - rejected_reward
                history.loss.append(loss.item())
                history.chosen_reward.append(chosen_reward.mean().item())
                history.rejected_reward.append(rejected_reward.mean().item())
                history.margin.append(margin.mean().item())
                history.accuracy.append((margin > 0).float().mean().item())
                trainer.tick(loss=history.loss[-1])
    return history


def dpo_implicit_accuracy(policy: nn.Module, reference: nn.Module, chosen_idx: torch.Tensor,
                          chosen_mask: torch.Tensor, rejected_idx: torch.Tensor,
                          rejected_mask: torch.Tensor) -> float:
    """The share of pairs whose chosen response gets the higher implicit reward, i.e. the
    larger log-ratio ``log pi - log pi_ref`` (a tie counts one half; beta does not matter).
    0.5 for the reference itself: every log-ratio is 0."""
    if policy is not reference:
        check_policy_and_reference(policy, reference)
    _check_pairs(chosen_idx, chosen_mask, rejected_idx, rejected_mask)
    with use_threads(threads_for(num_parameters(policy))):
        chosen = response_logprobs(policy, chosen_idx, chosen_mask) \
            - response_logprobs(reference, chosen_idx, chosen_mask)
        rejected = response_logprobs(policy, rejected_idx, rejected_mask) \
            - response_logprobs(reference, rejected_idx, rejected_mask)
    return pair_accuracy(chosen, rejected)
