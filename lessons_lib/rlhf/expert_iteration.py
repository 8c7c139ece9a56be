"""Expert iteration (chapter 11): sample, keep what a program says is right, fine-tune on it,
repeat. Also called rejection-sampling fine-tuning (STaR, Zelikman et al., 2022; the
baseline of DeepSeekMath and of Stanford CS336's reasoning assignment). No advantage, no
ratio, no reference: supervised learning on the policy's own best samples, the simplest RL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..checks import number_in, positive_int, positive_number, token_ids
from ..runtime import model_device
from ..scoring import masked_mean, sequence_logprobs
from .rollouts import rollout, score
from .trainer import History, Trainer, check_callback, check_policy, check_run_fields

__all__ = ["ExpertIterationConfig", "ExpertIterationHistory", "train_expert_iteration"]


@dataclass
class ExpertIterationConfig:
    iterations: int = 10
    prompts_per_iteration: int = 64  # distinct prompts sampled per iteration
    samples_per_prompt: int = 4      # tries per prompt; every try that passes is kept
    max_new_tokens: int = 8
    temperature: float = 1.0
    eot_id: int | None = None        # a response ends at its first eot_id (inclusive)
    threshold: float = 0.5           # a sample is kept when its reward is above this
    epochs: int = 1                  # passes over each iteration's kept samples
    batch_size: int = 64             # kept samples per optimizer step
    lr: float = 1e-4
    grad_clip: float = 1.0           # max gradient norm; 0 turns clipping off
    threads: int | None = None       # CPU threads; None: runtime.threads_for(model size)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("iterations", "prompts_per_iteration", "samples_per_prompt",
                     "max_new_tokens", "epochs", "batch_size"):
            positive_int(f"ExpertIterationConfig.{name}", getattr(self, name))
        positive_number("ExpertIterationConfig.temperature", self.temperature)
        number_in("ExpertIterationConfig.threshold", self.threshold)
        check_run_fields(self)


@dataclass
class ExpertIterationHistory(History):
    """One entry per iteration, measured on the iteration's samples (before its update)."""

    reward: list[float] = field(default_factory=list)          # mean reward of the samples
    kept: list[float] = field(default_factory=list)            # share above the threshold
    loss: list[float] = field(default_factory=list)            # mean NLL per kept token
    response_length: list[float] = field(default_factory=list)


def train_expert_iteration(policy: nn.Module, reward_fn, prompts: torch.Tensor,
                           config: ExpertIterationConfig | None = None,
                           callback=None) -> ExpertIterationHistory:
    """Optimise ``policy`` in place by expert iteration.

    Each iteration draws ``config.prompts_per_iteration`` distinct rows of ``prompts``
    (N, P), samples ``config.samples_per_prompt`` responses to each with
    :func:`lessons_lib.rlhf.rollouts.rollout`, scores them with ``reward_fn(batch: Rollout)
    -> (B,)`` and keeps those scoring above ``config.threshold``. It then minimises the mean
    negative log-likelihood of the kept responses' tokens (their end-of-text included; the
    prompts are not learned) for ``config.epochs`` passes, ``config.batch_size`` samples a
    step. An iteration that keeps nothing takes no step. Dropout is off throughout.

    ``callback(iteration, policy, history)``, if given, runs after every iteration (1, 2, ...);
    its time is not counted in ``history.seconds``.
    """
    config = config or ExpertIterationConfig()
    check_policy("policy", policy)
    check_callback(callback)
    token_ids(prompts, "prompts", shape="(N, P)")
    if config.prompts_per_iteration > len(prompts):
        raise ValueError(f"ExpertIterationConfig.prompts_per_iteration="
                         f"{config.prompts_per_iteration} is more than the {len(prompts)} "
                         "prompts given")
    device = model_device(policy)
    prompts = prompts.to(device)
    trainer = Trainer.for_config(policy, config, total=config.iterations,
                                 desc="expert iteration")
    generator = trainer.generator
    history = ExpertIterationHistory()
    with trainer.running(history):
        for iteration in range(config.iterations):
            pick = torch.randperm(len(prompts), generator=generator)
            pick = pick[:config.prompts_per_iteration]
            tries = prompts[pick.to(device)].repeat_interleave(config.samples_per_prompt, 0)
            batch = rollout(policy, tries, config.max_new_tokens, config.temperature,
                            config.eot_id, generator)
            rewards = score(reward_fn, batch)
            kept = (rewards > config.threshold).nonzero().flatten()
            losses = []
            for _ in range(config.epochs):
                order = kept[torch.randperm(len(kept), generator=generator).to(device)]
                for rows in order.split(config.batch_size):
                    logp = sequence_logprobs(policy, batch.sequences[rows],
                                             batch.response_mask[rows], config.temperature)
                    loss = -masked_mean(logp, batch.response_mask[rows])
                    trainer.step(loss)
                    losses.append(loss.item())
            history.reward.append(rewards.mean().item())
            history.kept.append(len(kept) / len(rewards))
            history.loss.append(sum(losses) / len(losses) if losses else float("nan"))
            history.response_length.append(batch.response_mask.sum(1).float().mean().item())
            trainer.tick(reward=history.reward[-1], kept=history.kept[-1])
            trainer.call_back(callback, iteration + 1, history)
    return history
