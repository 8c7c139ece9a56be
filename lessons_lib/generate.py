"""Sampling text from a language model, with a key/value cache.

``generate(model, idx, max_new_tokens, ...)`` appends ``max_new_tokens`` tokens to each row of
``idx``. Each new token is picked from the model's distribution over the next token: the most
likely one (``greedy=True``), or a random draw after temperature scaling, optionally restricted
to the ``top_k`` most likely tokens or to the smallest set whose probability reaches ``top_p``
(nucleus sampling).

With ``use_cache=True`` the keys and values of earlier positions are kept, so each step feeds
the model one token instead of the whole context. The model must offer
``model.new_kv_cache(batch_size)`` and accept ``model(idx, kv_cache=cache)``, as
``lessons_lib.model.GPT`` does. Once the text is longer than the model's ``block_size`` the
context window slides: the model sees only the last ``block_size`` tokens, at positions
``0 .. block_size - 1``. With learned absolute positions every key then moves to a new position,
so the cache is of no use and each step recomputes the window; the tokens are the same as
without a cache in every case.
"""

from __future__ import annotations

import torch


def _check_sampling(temperature, top_k, top_p, greedy, max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for the argmax), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus ``top_p``.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p``; the most likely token is always kept. ``logits`` has shape (..., vocab_size).
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs          # probability of the better tokens
        drop_sorted = mass_before >= top_p                    # already enough without this one
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token id per row from next-token logits of shape (batch, vocab_size)."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``idx`` (batch, T) (or (T,)) by ``max_new_tokens`` tokens; returns the whole sequence."""
    _check_sampling(temperature, top_k, top_p, greedy, max_new_tokens)
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (batch, T) or (T,) tensor of token ids with T >= 1, "
                         f"got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator; samples are drawn on the CPU")

    was_training = model.training
    model.eval()
    try:
        # inference mode: no autograd bookkeeping at all, which matters when each step is small
        with torch.inference_mode():
            out = _extend(model, idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache,
                          generator)
    finally:
        model.train(was_training)
    out = out.clone()              # an ordinary tensor again, usable where autograd records
    return out[0] if squeeze else out


def _extend(model, idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache, generator):
    device = next(model.parameters()).device
    block_size = model.config.block_size
    out = torch.empty(idx.size(0), idx.size(1) + max_new_tokens, dtype=torch.long, device=device)
    out[:, : idx.size(1)] = idx.to(device)
    length = idx.size(1)
    cache = None

    for _ in range(max_new_tokens):
        if use_cache and length <= block_size:
            if cache is None:                                  # prefill: the whole prompt at once
                cache = model.new_kv_cache(out.size(0))
                logits, _ = model(out[:, :length], kv_cache=cache)
            else:                                              # one new token, keys from the cache
                logits, _ = model(out[:, length - 1: length], kv_cache=cache)
        else:                                                  # no cache, or the window slides
            logits, _ = model(out[:, max(0, length - block_size): length])
        next_logits = logits[:, -1, :]
        if greedy:
            out[:, length] = next_logits.argmax(dim=-1)
        else:
            if generator is not None:                          # a CPU generator draws on the CPU
                next_logits = next_logits.cpu()
            token = sample_next(next_logits, temperature, top_k, top_p, generator=generator)
            out[:, length] = token[:, 0].to(device)
        length += 1
    return out
