"""Responses: sampling them from a policy (:func:`rollout`), what the policy said while
sampling (:class:`Rollout`), which tokens are the response (:func:`response_mask`), how they
are scored (:func:`score`, the one reward-function signature) and how varied they are
(:func:`entropy_from_logits`, :func:`distinct_n`).

Conventions. A batch of sequences is ``(B, L)``: a prompt of ``P`` tokens (the same ``P`` for
every row) followed by a response. Every per-token tensor (log-probs, values, rewards,
advantages) is ``(B, L)`` and aligned with the tokens: entry ``[b, t]`` belongs to token
``t``, the action taken after reading tokens ``0 .. t-1``. Position 0 has no such action; its
entries are 0. ``response_mask`` (bool, ``(B, L)``) is True on the response's tokens, up to and
including its first end-of-text token; everything else is masked out of every sum and mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import (eval_mode, finite, float_tensor, is_int, positive_int, positive_number,
                      shape_of, token_ids)
from ..generate import generate
from ..runtime import model_device
from ..scoring import logprobs_from_logits
from .trainer import check_policy

__all__ = ["Rollout", "response_mask", "language_model", "rollout", "score",
           "prompt_buckets", "draw_prompts",
           "check_groups", "entropy_from_logits",
           "distinct_n"]

@dataclass
class Rollout:
    """Responses sampled for a batch of prompts, and what the policy said while sampling."""

    sequences: torch.Tensor          # (B, L) long: prompt then response
    response_mask: torch.Tensor      # (B, L) bool: the response up to its first eot, inclusive
    logprobs: torch.Tensor           # (B, L): log-probs of the sampled tokens (0 off the mask)
    values: torch.Tensor | None      # (B, L): the value head's estimates (a PolicyWithValue)
    prompt_length: int

    @property
    def lengths(self) -> torch.Tensor:
        """(B,): prompt plus response, end-of-text included: what a :class:`RewardModel` reads."""
        return self.prompt_length + self.response_mask.sum(dim=1)

    def responses(self) -> list[list[int]]:
        """Each response's tokens, as a list of ints."""
        rows = zip(self.sequences.tolist(), self.response_mask.tolist())
        return [[t for t, m in zip(seq, mask) if m] for seq, mask in rows]

    def texts(self, tokenizer, eot_id: int | None = None) -> list[str]:
        """Each prompt and its response as text (``tokenizer.decode``), the end-of-text token
        ``eot_id`` left out: what a :class:`RewardModel` reads, as a string."""
        prompts = self.sequences[:, :self.prompt_length].tolist()
        return [tokenizer.decode(prompt + [t for t in response if t != eot_id])
                for prompt, response in zip(prompts, self.responses())]


def response_mask(sequences: torch.Tensor, prompt_length: int,
                  eot_id: int | None = None) -> torch.Tensor:
    """(B, L) bool: True on the tokens after the prompt, up to and including the first
    ``eot_id`` (every token after the prompt when ``eot_id`` is None)."""
    token_ids(sequences, "sequences")
    B, L = sequences.shape
    if not (is_int(prompt_length) and 1 <= prompt_length < L):
        raise ValueError(f"prompt_length must be an int in 1..{L - 1} (a response needs at "
                         f"least one token), got {prompt_length!r}")
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    response = sequences[:, prompt_length:]
    if eot_id is None:
        mask[:, prompt_length:] = True
        return mask
    is_eot = (response == eot_id).long()
    eots_before = is_eot.cumsum(dim=1) - is_eot                    # eot tokens strictly before
    mask[:, prompt_length:] = eots_before == 0
    return mask


def language_model(policy) -> nn.Module:
    """The language model that samples for ``policy``: ``policy`` itself, or the ``lm`` that a
    policy with a value head (:class:`lessons_lib.rlhf.ppo.PolicyWithValue`) wraps; checked."""
    lm = policy.lm if hasattr(policy, "value_head") else policy
    check_policy("policy", lm)
    return lm


def rollout(policy, prompts: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
            eot_id: int | None = None, generator: torch.Generator | None = None) -> Rollout:
    """Sample a response of ``max_new_tokens`` tokens for each prompt (rows of ``prompts``,
    (B, P), all of one length) with the KV cache, then score the samples with one forward pass
    (the log-probs; the values too when ``policy`` has a value head, as
    :class:`lessons_lib.rlhf.ppo.PolicyWithValue` has). Tokens after a response's first
    ``eot_id`` are sampled but masked out."""
    token_ids(prompts, "prompts", shape="(batch, P)")
    if prompts.size(1) == 0:
        raise ValueError("prompts must hold at least one token each, got shape "
                         f"{tuple(prompts.shape)}")
    positive_int("max_new_tokens", max_new_tokens)
    positive_number("temperature", temperature)
    with_values = hasattr(policy, "value_head")
    lm = language_model(policy)
    vocab_size = lm.config.vocab_size
    if eot_id is not None and not (is_int(eot_id) and 0 <= eot_id < vocab_size):
        raise ValueError(f"eot_id must be a token id in 0..{vocab_size - 1} or None, "
                         f"got {eot_id!r}")
    sequences = generate(lm, prompts, max_new_tokens, temperature=temperature,
                         generator=generator).to(model_device(lm))
    mask = response_mask(sequences, prompts.size(1), eot_id)
    with torch.no_grad(), eval_mode(policy):
        logits, values = policy(sequences)          # a language model's second output: None
    logprobs = torch.where(mask, logprobs_from_logits(logits, sequences, temperature), 0.0)
    values = torch.where(mask, values, 0.0) if with_values else None
    return Rollout(sequences, mask, logprobs, values, prompts.size(1))


def score(reward_fn, batch: Rollout) -> torch.Tensor:
    """``reward_fn(batch)``, checked: one finite score per sequence of ``batch``, on its
    device, computed without gradients. Every reward function of this package has that one
    signature, ``Rollout -> (B,)``: a :class:`lessons_lib.rlhf.reward_model.RewardModel`
    (which reads ``batch.sequences`` and ``batch.lengths``, in eval mode) or a program that
    checks the responses."""
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable (Rollout -> (B,) scores), got "
                         f"{type(reward_fn).__name__}")
    judge = eval_mode(reward_fn) if isinstance(reward_fn, nn.Module) else contextlib.nullcontext()
    with torch.no_grad(), judge:
        scores = reward_fn(batch)
    B = batch.sequences.size(0)
    if not isinstance(scores, torch.Tensor) or scores.shape != (B,):
        raise ValueError(f"reward_fn must return a tensor of shape ({B},), one score per "
                         f"sequence, got {shape_of(scores)}")
    return finite("the scores of reward_fn", scores.float().to(batch.logprobs.device))


def prompt_buckets(prompts, device) -> list[torch.Tensor] | None:
    """None for an (N, P) tensor of prompts; for a list of (N_i, P_i) tensors (prompts of
    different lengths: a GPT here has no padding mask, so a batch must share one length),
    the list checked and moved to ``device``."""
    if not isinstance(prompts, (list, tuple)):
        token_ids(prompts, "prompts", shape="(N, P)")
        return None
    if not prompts:
        raise ValueError("prompts must be an (N, P) tensor or a non-empty list of them")
    for i, p in enumerate(prompts):
        token_ids(p, f"prompts[{i}]", shape="(N, P)")
    return [p.to(device) for p in prompts]


def draw_prompts(buckets: list[torch.Tensor], n: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """``n`` rows of one bucket, drawn with replacement: the bucket is picked with a
    probability in proportion to its rows (repeat a prompt's row to give it more weight)."""
    sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    bucket = buckets[int(torch.multinomial(sizes, 1, generator=generator))]
    rows = torch.randint(len(bucket), (n,), generator=generator)
    return bucket[rows.to(bucket.device)]


def check_groups(rewards, group_size: int) -> torch.Tensor:
    """``rewards`` (B,) as ``(B / group_size, group_size)``: groups of samples of one prompt,
    one group after the other (prompt after prompt), as GRPO and RLOO sample them."""
    float_tensor("rewards", rewards, ndim=1)
    finite("rewards", rewards)
    if not (is_int(group_size) and group_size >= 2):
        raise ValueError(f"group_size must be an int >= 2 (a group compares its samples), "
                         f"got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards must hold whole groups of {group_size} (prompt after prompt), "
                         f"got {rewards.numel()} rewards")
    return rewards.view(-1, group_size)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, L): the entropy of the distribution each token was drawn from (aligned like
    :func:`lessons_lib.scoring.logprobs_from_logits`; position 0 gets 0)."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return F.pad(-(logp.exp() * logp).sum(dim=-1), (1, 0))


def distinct_n(seqs, n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams, pooled over ``seqs`` (a
    list of token lists or 1-D tensors). 1 when no n-gram repeats; 0 when there is no n-gram."""
    positive_int("n", n)
    seen, total = set(), 0
    for seq in seqs:
        tokens = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0
