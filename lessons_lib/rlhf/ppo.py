"""PPO (Schulman et al., 2017) as InstructGPT used it (chapter 10). Read top to bottom.

The pieces: :class:`PolicyWithValue` (a language model with a value head),
:func:`kl_penalized_rewards` (the k1 KL to a frozen reference folded into the reward),
:func:`gae` (advantages), :func:`clipped_surrogate` and :func:`ppo_losses` (the clipped
objectives). The loop: :class:`PPOConfig`, :func:`ppo_step` (minibatch epochs over one batch
of rollouts) and :func:`train_ppo` (rollout, reward, KL, GAE, update; logged per iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import finite, float_tensor, number_in, positive_int, positive_number, same_shape
from ..checks import token_ids
from ..model import DecoderLM
from ..runtime import model_device
from ..scoring import check_response_mask, logprobs_from_logits, masked_mean, sequence_logprobs
from .kl import k1
from .rollouts import Rollout, distinct_n, entropy_from_logits, rollout, score
from .trainer import (History, Trainer, check_callback, check_policy, check_run_fields,
                      check_policy_and_reference, optimizer_step)

__all__ = ["PolicyWithValue", "kl_penalized_rewards", "gae", "clipped_surrogate", "PPOLosses",
           "ppo_losses", "PPOConfig", "PPOHistory", "ppo_step", "train_ppo"]


class PolicyWithValue(nn.Module):
    """A language model ``lm`` (the policy, trained in place: a GPT or a Llama) and a value
    head on its final hidden states.

    ``forward(idx) -> (logits (B, L, V), values (B, L))``, where ``values[:, t]`` estimates the
    return still to come *before* token ``t`` is chosen (read from the hidden state at
    ``t - 1``; ``values[:, 0]`` is 0): aligned with the tokens like every per-token tensor here.
    """

    def __init__(self, lm: DecoderLM):
        super().__init__()
        check_policy("lm", lm, needs_hidden_states=True)
        self.lm = lm
        self.value_head = nn.Linear(lm.config.n_embd, 1, device=model_device(lm))
        nn.init.zeros_(self.value_head.weight)       # every value starts at 0
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor):
        h = self.lm.hidden_states(idx)                             # (B, L, n_embd)
        logits = self.lm.lm_head(h)
        values = F.pad(self.value_head(h[:, :-1]).squeeze(-1), (1, 0))
        return logits, values.float()

def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor,
                         ref_logprobs: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, L) and the per-token KL estimate (B, L).

    The KL estimate is :func:`lessons_lib.rlhf.kl.k1`,
    ``log p_policy(token) - log p_ref(token)`` of the sampled token:
    summed over a response it is an unbiased estimate of KL(policy || reference) for that
    prompt, exactly 0 when the two models agree, and its policy gradient is the gradient of
    the KL itself (InstructGPT's choice). One token's or one sample's estimate can be
    negative; the mean over many samples is not. Every response token is rewarded
    ``-kl_coef * kl``; the last one also gets the reward model's ``scores`` (B,), the
    judgement of the whole text.
    """
    float_tensor("scores", scores, ndim=1)
    float_tensor("logprobs", logprobs, ndim=2)
    float_tensor("ref_logprobs", ref_logprobs, ndim=2)
    same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_response_mask(mask, logprobs.shape)
    if scores.shape != (logprobs.size(0),):
        raise ValueError(f"scores must have shape ({logprobs.size(0)},), one per sequence, "
                         f"got {tuple(scores.shape)}")
    finite("scores", scores)
    number_in("kl_coef", kl_coef, low=0.0)
    kl = torch.where(mask, k1(logprobs, ref_logprobs), 0.0)
    rewards = -kl_coef * kl
    last = mask.size(1) - 1 - mask.flip(1).int().argmax(dim=1)     # each response's last token
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), (B, L) in, (B, L) out.

    Backwards over the tokens of every response at once, with ``V = 0`` after a response ends:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    Returns ``(advantages, returns)`` with ``returns = advantages + values``, 0 off the mask.
    ``mask`` must be one run of True per row (a response).
    """
    float_tensor("rewards", rewards, ndim=2)
    float_tensor("values", values, ndim=2)
    same_shape(rewards=rewards, values=values)
    check_response_mask(mask, rewards.shape)
    finite("rewards", rewards)
    finite("values", values)
    gamma, lam = number_in("gamma", gamma, 0.0, 1.0), number_in("lam", lam, 0.0, 1.0)
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_advantage = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.size(1))):                   # over time; the batch in one go
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[:, t] = next_advantage
        next_value = v[:, t]
    return advantages, (advantages + v) * m


def clipped_surrogate(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float):
    """Per token: PPO's clipped policy loss ``max(-A ratio, -A clip(ratio))`` (B, L), the ratio,
    and whether it left the clip range; ``advantages`` (B, L) or (B, 1)."""
    log_ratio = torch.where(mask, new_logp - old_logp, 0.0)
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio,
                         -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    return loss, ratio, log_ratio


@dataclass
class PPOLosses:
    policy: torch.Tensor             # the clipped surrogate, to minimise
    value: torch.Tensor              # the clipped value loss, to minimise
    approx_kl: torch.Tensor          # mean of (ratio - 1) - log ratio: how far the update moved
    clip_fraction: torch.Tensor      # share of tokens whose ratio left [1 - clip, 1 + clip]


def ppo_losses(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2, vf_clip: float = 0.2) -> PPOLosses:
    """PPO's clipped objectives (Schulman et al., 2017), averaged over the masked tokens.

    policy: ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))`` with
    ``ratio = exp(new_logp - old_logp)``: no gain from moving a token's probability further
    than the clip range in the direction its advantage favours.
    value: ``0.5 * max((V - R)^2, (V_clipped - R)^2)``, ``V_clipped`` kept within ``vf_clip``
    of ``old_values``, so the value head also moves only a little per batch.
    """
    tensors = dict(new_logp=new_logp, old_logp=old_logp, advantages=advantages, values=values,
                   old_values=old_values, returns=returns)
    for name, t in tensors.items():
        float_tensor(name, t, ndim=2)
    same_shape(**tensors)
    check_response_mask(mask, new_logp.shape)
    clip, vf_clip = positive_number("clip", clip), positive_number("vf_clip", vf_clip)

    token_loss, ratio, log_ratio = clipped_surrogate(new_logp, old_logp, advantages, mask, clip)
    policy_loss = masked_mean(token_loss, mask)

    values_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    value_error = torch.maximum((values - returns).square(), (values_clipped - returns).square())
    value_loss = 0.5 * masked_mean(value_error, mask)

    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
    return PPOLosses(policy_loss, value_loss, approx_kl, clip_fraction)


# -- the loop

@dataclass
class PPOConfig:
    iterations: int = 80
    batch_size: int = 64             # prompts (and responses) per iteration
    max_new_tokens: int = 24
    temperature: float = 1.0
    eot_id: int | None = None        # a response ends at its first eot_id (inclusive)
    kl_coef: float = 0.1             # weight of the per-token KL penalty in the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1             # weight of the value loss in the total loss
    epochs: int = 4                  # passes over each batch of rollouts
    minibatches: int = 2             # optimizer steps per pass
    lr: float = 5e-5
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    whiten_advantages: bool = True   # advantages to mean 0, std 1 over the batch's tokens
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "batch_size", "max_new_tokens", "epochs", "minibatches"):
            positive_int(f"PPOConfig.{name}", getattr(self, name))
        for name in ("temperature", "clip", "vf_clip"):
            positive_number(f"PPOConfig.{name}", getattr(self, name))
        for name in ("gamma", "lam"):
            number_in(f"PPOConfig.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("kl_coef", "vf_coef"):
            number_in(f"PPOConfig.{name}", getattr(self, name), low=0.0)
        if self.minibatches > self.batch_size:
            raise ValueError(f"PPOConfig.minibatches={self.minibatches} is more than "
                             f"batch_size={self.batch_size}: a minibatch would be empty")
        check_run_fields(self)


@dataclass
class PPOHistory(History):
    """One entry per iteration; ``reward`` is the reward model's mean score of the batch."""

    reward: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)              # per sequence, summed over tokens
    entropy: list[float] = field(default_factory=list)         # per token
    clip_fraction: list[float] = field(default_factory=list)
    approx_kl: list[float] = field(default_factory=list)
    policy_loss: list[float] = field(default_factory=list)
    value_loss: list[float] = field(default_factory=list)
    distinct_2: list[float] = field(default_factory=list)
    response_length: list[float] = field(default_factory=list)


def ppo_step(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, batch: Rollout,
             advantages: torch.Tensor, returns: torch.Tensor, config: PPOConfig,
             generator: torch.Generator | None = None) -> dict[str, float]:
    """``config.epochs`` passes over ``batch`` in ``config.minibatches`` shuffled minibatches,
    one optimizer step each; returns the mean of each loss and statistic over the steps."""
    if batch.values is None:
        raise ValueError("the rollout has no values: sample it with a PolicyWithValue")
    mask = batch.response_mask
    if config.whiten_advantages:
        mean = masked_mean(advantages, mask)
        std = masked_mean((advantages - mean).square(), mask).sqrt()
        advantages = torch.where(mask, (advantages - mean) / (std + 1e-8), 0.0)
    B = batch.sequences.size(0)
    n_minibatches = min(config.minibatches, B)
    totals: dict[str, float] = {}
    for _ in range(config.epochs):
        order = torch.randperm(B, generator=generator).to(mask.device)
        # exactly n_minibatches, of sizes differing by at most one row (chunk can give fewer)
        for rows in order.tensor_split(n_minibatches):
            logits, values = policy(batch.sequences[rows])
            new_logp = logprobs_from_logits(logits, batch.sequences[rows], config.temperature)
            losses = ppo_losses(new_logp, batch.logprobs[rows], advantages[rows], values,
                                batch.values[rows], returns[rows], mask[rows],
                                config.clip, config.vf_clip)
            optimizer_step(optimizer, losses.policy + config.vf_coef * losses.value, policy,
                           config.grad_clip)
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits, config.temperature), mask[rows])
            step = dict(policy_loss=losses.policy, value_loss=losses.value, entropy=entropy,
                        approx_kl=losses.approx_kl, clip_fraction=losses.clip_fraction)
            for name, value in step.items():
                totals[name] = totals.get(name, 0.0) + value.item()
    n_steps = config.epochs * n_minibatches
    return {name: total / n_steps for name, total in totals.items()}


def train_ppo(policy: PolicyWithValue, reference: nn.Module, reward_fn, prompts: torch.Tensor,
              config: PPOConfig | None = None, callback=None) -> PPOHistory:
    """Optimise ``policy`` in place with PPO against ``reward_fn``, kept near ``reference``.

    ``reward_fn(batch: Rollout) -> scores (B,)`` judges whole texts (a :class:`RewardModel`
    is one); ``reference`` is frozen (usually the policy's starting point); ``prompts`` (N, P)
    are drawn ``config.batch_size`` at a time. Each iteration: rollout -> scores and the KL to
    the reference -> per-token rewards -> GAE -> PPO epochs. Dropout is off throughout, so the
    first ratio of every batch is exactly 1.

    ``callback(iteration, policy, history)``, if given, runs after every iteration (1, 2, ...),
    e.g. to evaluate checkpoints with :func:`evaluate_policy`; its time is not counted in
    ``history.seconds``, and it must leave the policy's weights as it found them.
    """
    config = config or PPOConfig()
    check_callback(callback)
    if not isinstance(policy, PolicyWithValue):
        raise ValueError(f"policy must be a PolicyWithValue, got {type(policy).__name__}")
    check_policy_and_reference(policy.lm, reference,
                               hint="wrap a copy, PolicyWithValue(copy.deepcopy(base))")
    token_ids(prompts, "prompts", shape="(N, P)")
    device = model_device(policy)
    prompts = prompts.to(device)
    trainer = Trainer.for_config(policy, config, total=config.iterations, desc="PPO")
    generator = trainer.generator
    history = PPOHistory()
    with trainer.running(history, reference):
        for iteration in range(config.iterations):
            pick = torch.randint(len(prompts), (config.batch_size,), generator=generator)
            batch = rollout(policy, prompts[pick.to(device)], config.max_new_tokens,
                            config.temperature, config.eot_id, generator)
            scores = score(reward_fn, batch)
            with torch.no_grad():
                ref_logp = sequence_logprobs(reference, batch.sequences, batch.response_mask,
                                             config.temperature)
            rewards, kl = kl_penalized_rewards(scores, batch.logprobs, ref_logp,
                                               batch.response_mask, config.kl_coef)
            advantages, returns = gae(rewards, batch.values, batch.response_mask,
                                      config.gamma, config.lam)
            stats = ppo_step(policy, trainer.optimizer, batch, advantages, returns, config,
                             generator)
            _log(history, stats, scores, kl, batch)
            trainer.tick(reward=history.reward[-1], kl=history.kl[-1])
            trainer.call_back(callback, iteration + 1, history)
    return history


def _log(history: PPOHistory, stats: dict, scores, kl, batch: Rollout) -> None:
    history.reward.append(scores.mean().item())
    history.kl.append(kl.sum(dim=1).mean().item())
    history.distinct_2.append(distinct_n(batch.responses(), 2))
    history.response_length.append(batch.response_mask.sum(dim=1).float().mean().item())
    for name, value in stats.items():
        getattr(history, name).append(value)
