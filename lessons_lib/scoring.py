"""Scoring given tokens: how likely a language model finds them. Read top to bottom.

Sampling (:mod:`lessons_lib.generate`) draws each token from the model's next-token
distribution; scoring reads off the probability that distribution gives a token already there.
One function does the reading, a ``log_softmax`` and a ``gather``; the others build on it:

1. :func:`token_logprobs` -- ``log p(token)`` of chosen tokens under next-token logits.
2. :func:`logprobs_from_logits` -- for the logits of one forward pass over a sequence, each
   token's log-probability given the tokens before it.
3. :func:`sequence_logprobs` -- the same from the model, kept where a mask is True (a
   response); :func:`response_logprobs` -- their sums per row, in batches, without gradients.
4. :func:`encode_responses` -- rows of a prompt then a response, right-padded, with the mask
   of the response tokens: what the two above read.

Right padding changes nothing: in a causal model no position sees the positions after it.
These score the continuations of chapter 9 (:func:`lessons_lib.finetune.continuation_logprobs`),
the candidates of chapter 13 (:func:`lessons_lib.limitations.choice_probs`) and the responses
of RLHF, DPO and GRPO (:mod:`lessons_lib.rlhf`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import bool_mask, eval_mode, is_int, positive_number, token_ids
from .runtime import model_device

__all__ = ["token_logprobs", "logprobs_from_logits", "sequence_logprobs", "response_logprobs",
           "encode_responses", "check_response_mask", "masked_mean"]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """(..., K): ``log p(tokens[..., k])`` under the distribution ``softmax(logits / T)`` of the
    same leading position, from ``logits`` (..., V) and integer ``tokens`` (..., K), computed in
    float32 at least."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)            # (..., V)
    return logp.gather(-1, tokens.long())                                 # (..., K)


def logprobs_from_logits(logits: torch.Tensor, idx: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """(B, L): ``log p(idx[:, t] | idx[:, :t])`` from the logits (B, L, V) of one forward pass
    over ``idx`` (B, L); position 0, which nothing predicts, gets 0. The logits at ``t - 1``
    predict token ``t``."""
    taken = token_logprobs(logits[:, :-1], idx[:, 1:, None], temperature)   # (B, L-1, 1)
    return F.pad(taken.squeeze(-1), (1, 0))


def _logits(model, idx: torch.Tensor) -> torch.Tensor:
    """The logits of a lessons_lib model: ``model(idx)`` returns ``(logits, something)``."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def sequence_logprobs(model, idx: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """(B, L): the log-probability ``model`` gives each token of ``idx`` (B, L) where ``mask``
    (B, L, bool) is True, 0 elsewhere, from one forward pass. ``.sum(dim=1)`` is each response's
    log-probability. ``mask[:, 0]`` must be False: nothing predicts the first token."""
    token_ids(idx, "idx")
    check_response_mask(mask, idx.shape)
    if mask[:, 0].any():
        raise ValueError("mask[:, 0] must be False: the first token has no prediction")
    positive_number("temperature", temperature)
    logp = logprobs_from_logits(_logits(model, idx), idx, temperature)
    return torch.where(mask, logp, 0.0)


def check_response_mask(mask, shape) -> torch.Tensor:
    """A (B, L) response mask: bool, of ``shape``, with at least one token in every row."""
    return bool_mask("mask", mask, shape, meaning="True on a response's tokens",
                     empty_row="empty responses, with no token in the mask; every "
                               "sequence needs at least one response token")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the tokens where ``mask`` is True (all rows pooled)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def response_logprobs(model, idx: torch.Tensor, mask: torch.Tensor,
                      batch_size: int = 256) -> torch.Tensor:
    """(B,) on the CPU: each row's :func:`sequence_logprobs` summed, in batches of
    ``batch_size`` rows, in eval mode, without gradients."""
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        return torch.cat([sequence_logprobs(model, idx[i:i + batch_size].to(device),
                                            mask[i:i + batch_size].to(device)).sum(dim=1).cpu()
                          for i in range(0, len(idx), batch_size)])


def encode_responses(prompts, responses, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx (B, L), mask (B, L))`` from token lists: row ``b`` is ``prompts[b]`` then
    ``responses[b]``, right-padded with ``pad_id``; ``mask`` is True on the response's tokens
    only, what :func:`sequence_logprobs` sums. Prompts may differ in length (human pairs)."""
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)) \
            or not prompts or len(prompts) != len(responses):
        raise ValueError("prompts and responses must be non-empty lists of token lists, one "
                         "response per prompt")
    if not is_int(pad_id) or pad_id < 0:
        raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(prompt) < 1 or len(response) < 1:
            raise ValueError(f"row {b} has an empty prompt or response: each needs a token")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        idx[b, :len(prompt) + len(response)] = torch.tensor(list(prompt) + list(response))
        mask[b, len(prompt):len(prompt) + len(response)] = True
    return idx, mask
