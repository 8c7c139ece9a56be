"""GRPO (Shao et al., 2024; chapter 11): advantages from a group of samples per prompt, no
value head, a reward a program computes. Read top to bottom.

:func:`group_advantages` (each sample against the rest of its group: GRPO's mean and standard
deviation, Dr. GRPO's mean alone, or RLOO's leave-one-out mean), :func:`no_signal_fraction`,
:func:`grpo_losses` (PPO's clipped surrogate with one advantage per sequence, plus the k3 KL
to the reference, averaged per sequence, per token or by a constant); the loop:
:class:`GRPOConfig` and :func:`train_grpo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..checks import finite, float_tensor, is_int, number_in, positive_int
from ..checks import positive_number, same_shape, shape_of
from ..runtime import model_device
from ..scoring import check_response_mask, logprobs_from_logits, masked_mean, sequence_logprobs
from .kl import k3
from .ppo import clipped_surrogate
from .rollouts import (check_groups, draw_prompts, entropy_from_logits, prompt_buckets, rollout,
                       score)
from .trainer import (History, Trainer, check_callback, check_policy_and_reference,
                      check_run_fields)

__all__ = ["group_advantages", "no_signal_fraction", "AGGREGATIONS", "GRPOLosses",
           "grpo_losses", "GRPOConfig", "GRPOHistory", "train_grpo"]

AGGREGATIONS = ("sequence", "token", "constant")     # GRPO, DAPO, Dr. GRPO: see grpo_losses


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4, leave_one_out: bool = False) -> torch.Tensor:
    """(B,): each sample's reward minus a baseline from its group.

    The baseline is the group's mean (GRPO, Shao et al., 2024), or with ``leave_one_out`` the
    mean of the *other* ``group_size - 1`` samples (RLOO, Ahmadian et al., 2024: a baseline
    that does not contain the sample itself, so the estimate stays unbiased; it equals the
    group-mean advantage times ``G / (G - 1)``). With ``scale_by_std`` the result is divided by
    the group's standard deviation (Bessel-corrected) plus ``eps``, as GRPO does; Dr. GRPO
    (Liu et al., 2025) and RLOO do not: dividing by the std up-weights groups whose rewards
    barely differ, i.e. prompts that are too easy or too hard.

    ``rewards`` (B,) holds ``B / group_size`` groups one after the other: samples ``0 ..
    group_size - 1`` answer the first prompt, and so on. A group whose rewards are all equal
    gets advantage 0 for every sample: it carries no signal.
    """
    groups = check_groups(rewards, group_size)
    positive_number("eps", eps)
    if leave_one_out:
        others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        centred = groups - others
    else:
        centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def no_signal_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The fraction of groups whose rewards are all equal: GRPO learns nothing from them."""
    groups = check_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean().item()


@dataclass
class GRPOLosses:
    loss: torch.Tensor            # what to minimise: policy_loss + kl_coef * kl
    policy_loss: torch.Tensor
    kl: torch.Tensor              # the k3 estimate of KL(policy || reference) per token, detached
    clip_fraction: torch.Tensor   # share of response tokens whose ratio left the clip range


def grpo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                clip: float = 0.2, aggregation: str = "token",
                max_new_tokens: int | None = None) -> GRPOLosses:
    """GRPO's objective: PPO's clipped surrogate with one advantage per sequence (B,) spread
    over its response tokens, plus ``kl_coef`` times a per-token KL to the reference.

    The KL is the k3 estimator ``exp(q) - q - 1`` with ``q = ref_logp - new_logp`` (unbiased
    and never negative), as in DeepSeekMath, with ``q`` clamped to [-20, 20] against overflow;
    ``ref_logp`` is needed when ``kl_coef > 0``.

    ``aggregation`` says how the per-token losses become one number (one of
    :data:`AGGREGATIONS`):

    - "sequence": over each sequence's tokens, then over sequences (the original GRPO; TRL's
      ``loss_type="grpo"``): a token of a short response weighs more than one of a long
      response, which biases the policy's response length;
    - "token": over every response token of the batch at once, so each token counts the same
      (DAPO's token mean; TRL's ``loss_type="bnpo"``);
    - "constant": the batch's sum divided by ``B * max_new_tokens``, a number that does not
      depend on the responses (Dr. GRPO, Liu et al., 2025; TRL's ``loss_type="dr_grpo"``).
    """
    for name, t in dict(new_logp=new_logp, old_logp=old_logp).items():
        float_tensor(name, t, ndim=2)
    same_shape(new_logp=new_logp, old_logp=old_logp)
    check_response_mask(mask, new_logp.shape)
    float_tensor("advantages", advantages, ndim=1)
    finite("advantages", advantages)
    if advantages.shape[0] != new_logp.shape[0]:
        raise ValueError(f"advantages must have one entry per sequence ({new_logp.shape[0]}), "
                         f"got shape {shape_of(advantages)}")
    kl_coef = number_in("kl_coef", kl_coef, 0.0, math.inf, high_open=True)
    clip = positive_number("clip", clip)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "constant":
        positive_int("max_new_tokens (the constant aggregation's normaliser)", max_new_tokens)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp, the reference's per-token log-probs")

    def average(x):
        if aggregation == "token":
            return masked_mean(x, mask)
        if aggregation == "constant":
            return torch.where(mask, x, 0.0).sum() / (mask.size(0) * max_new_tokens)
        per_sequence = torch.where(mask, x, 0.0).sum(dim=1) / mask.sum(dim=1)
        return per_sequence.mean()

    token_loss, ratio, _ = clipped_surrogate(new_logp, old_logp, advantages[:, None], mask, clip)
    policy_loss = average(token_loss)
    if ref_logp is not None:
        float_tensor("ref_logp", ref_logp, ndim=2)
        same_shape(new_logp=new_logp, ref_logp=ref_logp)
        kl = average(torch.where(mask, k3(new_logp, ref_logp), 0.0))
    else:
        kl = torch.zeros((), dtype=new_logp.dtype, device=new_logp.device)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return GRPOLosses(policy_loss + kl_coef * kl, policy_loss, kl.detach(), clip_fraction)



@dataclass
class GRPOConfig:
    iterations: int = 40
    prompts_per_iteration: int = 16  # distinct prompts per batch, each sampled group_size times
    group_size: int = 8              # G: samples per prompt, compared with one another
    max_new_tokens: int = 8
    temperature: float = 1.0
    eot_id: int | None = None        # a response ends at its first eot_id (inclusive)
    kl_coef: float = 0.04            # weight of the k3 KL to the reference (DeepSeekMath's)
    clip: float = 0.2
    scale_by_std: bool = True        # False: Dr. GRPO's advantages, not divided by the std
    leave_one_out: bool = False      # True: RLOO's baseline, the mean of the other samples
    aggregation: str = "token"       # one of AGGREGATIONS: see grpo_losses
    epochs: int = 1                  # passes over each batch of samples
    minibatches: int = 2             # optimizer steps per pass
    lr: float = 1e-4
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "max_new_tokens", "epochs",
                     "minibatches"):
            positive_int(f"GRPOConfig.{name}", getattr(self, name))
        if not (is_int(self.group_size) and self.group_size >= 2):
            raise ValueError(f"GRPOConfig.group_size must be an int >= 2 (a group compares its "
                             f"samples), got {self.group_size!r}")
        for name in ("temperature", "clip"):
            positive_number(f"GRPOConfig.{name}", getattr(self, name))
        number_in("GRPOConfig.kl_coef", self.kl_coef, low=0.0)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"GRPOConfig.aggregation must be one of {AGGREGATIONS}, got "
                             f"{self.aggregation!r}")
        if self.minibatches > self.prompts_per_iteration * self.group_size:
            raise ValueError(f"GRPOConfig.minibatches={self.minibatches} is more than the "
                             f"{self.prompts_per_iteration * self.group_size} samples per "
                             "iteration: a minibatch would be empty")
        check_run_fields(self)


@dataclass
class GRPOHistory(History):
    """One entry per iteration, measured on the iteration's samples (before its update)."""

    reward: list[float] = field(default_factory=list)          # mean reward of the samples
    no_signal: list[float] = field(default_factory=list)       # share of groups all equal
    kl: list[float] = field(default_factory=list)              # k1, nats per response
    entropy: list[float] = field(default_factory=list)         # per response token
    clip_fraction: list[float] = field(default_factory=list)   # mean over the steps
    response_length: list[float] = field(default_factory=list)


def train_grpo(policy: nn.Module, reference: nn.Module, reward_fn,
               prompts: torch.Tensor | list[torch.Tensor], config: GRPOConfig | None = None,
               callback=None) -> GRPOHistory:
    """Optimise ``policy`` (a language model: no value head) in place with GRPO.

    Each iteration draws ``config.prompts_per_iteration`` distinct rows of ``prompts`` (N, P),
    repeats each ``config.group_size`` times, samples responses with
    :func:`lessons_lib.rlhf.rollouts.rollout`, and asks ``reward_fn(batch: Rollout) -> (B,)``
    for one reward per sample (e.g. 1 for a correct answer). :func:`group_advantages`
    compares each sample with the others of its prompt; :func:`grpo_losses` turns them into
    the clipped objective, with ``config.kl_coef`` times the KL to the frozen ``reference``.
    Dropout is off, so each batch's first ratio is 1.

    ``prompts`` may also be a list of (N_i, P_i) tensors, prompts of different lengths: each
    iteration then takes its rows from one of them (:func:`~.rollouts.draw_prompts`).

    ``callback(iteration, policy, history)``, if given, runs after every iteration (1, 2, ...);
    its time is not counted in ``history.seconds``.
    """
    config = config or GRPOConfig()
    check_policy_and_reference(policy, reference)
    check_callback(callback)
    device = model_device(policy)
    buckets = prompt_buckets(prompts, device)
    if buckets is None:
        if config.prompts_per_iteration > len(prompts):
            raise ValueError(f"GRPOConfig.prompts_per_iteration={config.prompts_per_iteration} "
                             f"is more than the {len(prompts)} prompts given")
        prompts = prompts.to(device)
    G = config.group_size
    trainer = Trainer.for_config(policy, config, total=config.iterations, desc="GRPO")
    generator = trainer.generator
    history = GRPOHistory()
    with trainer.running(history, reference):
        for iteration in range(config.iterations):
            if buckets is None:
                pick = torch.randperm(len(prompts), generator=generator)
                chosen = prompts[pick[:config.prompts_per_iteration].to(device)]
            else:
                chosen = draw_prompts(buckets, config.prompts_per_iteration, generator)
            group_prompts = chosen.repeat_interleave(G, dim=0)
            batch = rollout(policy, group_prompts, config.max_new_tokens, config.temperature,
                            config.eot_id, generator)
            rewards = score(reward_fn, batch)
            advantages = group_advantages(rewards, G, config.scale_by_std,
                                          leave_one_out=config.leave_one_out)
            mask = batch.response_mask
            with torch.no_grad():
                ref_logp = sequence_logprobs(reference, batch.sequences, mask, config.temperature)
            entropy, clip_fraction, n_steps = 0.0, 0.0, 0
            for _ in range(config.epochs):
                order = torch.randperm(len(rewards), generator=generator).to(device)
                for rows in order.tensor_split(min(config.minibatches, len(rewards))):
                    logits, _ = policy(batch.sequences[rows])
                    new_logp = logprobs_from_logits(logits, batch.sequences[rows],
                                                    config.temperature)
                    losses = grpo_losses(new_logp, batch.logprobs[rows], advantages[rows],
                                         mask[rows], ref_logp[rows], config.kl_coef,
                                         config.clip, config.aggregation,
                                         config.max_new_tokens)
                    trainer.step(losses.loss)
                    with torch.no_grad():
                        token_entropy = entropy_from_logits(logits, config.temperature)
                        entropy += masked_mean(token_entropy, mask[rows]).item()
                    clip_fraction += losses.clip_fraction.item()
                    n_steps += 1
            history.reward.append(rewards.mean().item())
            history.no_signal.append(no_signal_fraction(rewards, G))
            history.kl.append((batch.logprobs - ref_logp).sum(dim=1).mean().item())
            history.entropy.append(entropy / n_steps)
            history.clip_fraction.append(clip_fraction / n_steps)
            history.response_length.append(mask.sum(dim=1).float().mean().item())
            trainer.tick(reward=history.reward[-1], kl=history.kl[-1])
            trainer.call_back(callback, iteration + 1, history)
    return history
