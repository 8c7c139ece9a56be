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

import math
from numbers import Real

import torch

from .checks import eval_mode, is_int, non_negative_int, token_ids
from .runtime import model_device


def _check_sampling(temperature, top_k, top_p, greedy, max_new_tokens=0) -> None:
    non_negative_int("max_new_tokens", max_new_tokens)
    if not greedy:
        if isinstance(temperature, bool) or not isinstance(temperature, Real) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0 (use greedy=True for the "
                             f"argmax), got {temperature!r}")
    _check_filters(top_k, top_p)


def _check_filters(top_k, top_p) -> None:
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be a positive int or None (None keeps every token; "
                         f"top_k=0 would keep none), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real)
                              or not 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be a number in [0, 1] or None, got {top_p!r}")


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.size(-1) == 0 \
            or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor of shape (..., vocab_size), got "
                         + (f"dtype {logits.dtype}, shape {tuple(logits.shape)}"
                            if isinstance(logits, torch.Tensor) else type(logits).__name__))
    # the values are read on the CPU only: on a GPU this would wait for the device at every
    # sampled token (there torch.multinomial refuses NaN and inf itself)
    if logits.device.type == "cpu" and (torch.isnan(logits).any() or torch.isposinf(logits).any()):
        raise ValueError("logits hold NaN or +inf: no distribution can be made of them "
                         "(-inf is fine: it marks a token that cannot be chosen)")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus ``top_p``.

    ``logits`` is a float tensor of shape (..., vocab_size) without NaN or +inf (ValueError).

    ``top_k``: a positive int, or None to keep every token. A ``top_k`` of at least the
    vocabulary size keeps every token. Tokens tied with the k-th largest logit are all kept (as
    Hugging Face's ``TopKLogitsWarper`` does), so ties can leave more than ``top_k`` tokens.

    ``top_p``: a number in [0, 1], or None (like 1) to keep every token. The nucleus is the
    smallest set of most likely tokens whose probabilities sum to at least ``top_p``: a token is
    kept when the tokens strictly more likely than it hold less than ``top_p`` of the
    probability. The most likely token is always kept, so ``top_p=0`` keeps it alone; tokens
    with equal logits are kept or dropped together. Without ties this is Hugging Face's
    ``TopPLogitsWarper``. With both, top-k is applied first and the nucleus is taken from what
    remains (renormalised), as Hugging Face's processors chained in that order do.
    """
    _check_logits(logits)
    _check_filters(top_k, top_p)
    return _filter(logits, top_k, top_p)


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """filter_logits without the argument checks (its callers have made them)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs          # probability of the better tokens
        # a tie shares the mass before its first member, so tied tokens stay or go together
        index = torch.arange(logits.size(-1), device=logits.device).expand_as(sorted_logits)
        first = torch.ones_like(sorted_logits, dtype=torch.bool)
        first[..., 1:] = sorted_logits[..., 1:] != sorted_logits[..., :-1]
        group_start = torch.where(first, index, 0).cummax(dim=-1).values
        mass_before = mass_before.gather(-1, group_start)
        # already enough without this one; the most likely token (group) always stays
        drop_sorted = (mass_before >= top_p) & (group_start > 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token id per row from next-token logits of shape (batch, vocab_size).

    ``greedy=True`` takes the argmax (``temperature``, ``top_k`` and ``top_p`` are then not
    used, but still checked). Otherwise the logits are divided by ``temperature`` (a finite
    number > 0), filtered by :func:`filter_logits`, and one token is drawn from the softmax.
    Returns a (batch, 1) tensor of int64 ids."""
    _check_sampling(temperature, top_k, top_p, greedy)
    _check_logits(logits)
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = _filter(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, greedy: bool = False, use_cache: bool = True,
             generator: torch.Generator | None = None, stop_ids=(), on_token=None
             ) -> torch.Tensor:
    """Extend ``idx`` (batch, T) (or (T,)) by up to ``max_new_tokens`` tokens; returns the whole
    sequence. Works for every model of :class:`lessons_lib.model.LanguageModel`.

    The model reads at most its ``block_size`` last tokens (all of them when it is None). With
    ``use_cache`` and a model that has ``new_kv_cache``, the prompt runs once and each new token
    is one position through the model, keys and values kept in a cache sized to the prompt plus
    the new tokens (at most ``block_size``); past that the window slides without a cache.
    ``stop_ids``: generation ends once every row has written one of these ids; a row that has
    stopped repeats its stop id until the others stop too. ``on_token``, if given, is called
    after every step with the new tokens, a (batch,) tensor: to stream them, e.g. to a terminal
    (:mod:`lessons_lib.chat`)."""
    _check_sampling(temperature, top_k, top_p, greedy, max_new_tokens)
    if on_token is not None and not callable(on_token):
        raise ValueError(f"on_token must be callable or None, got {type(on_token).__name__}")
    stop_ids = [int(s) for s in stop_ids]
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a (batch, T) or (T,) tensor of token ids with T >= 1, "
                         f"got shape {tuple(idx.shape)}")
    token_ids(idx, "idx")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator; samples are drawn on the CPU")

    # inference mode: no autograd bookkeeping at all, which matters when each step is small
    with eval_mode(model), torch.inference_mode():
        out = _extend(model, idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache,
                      generator, stop_ids, on_token)
    out = out.clone()              # an ordinary tensor again, usable where autograd records
    return out[0] if squeeze else out


def _extend(model, idx, max_new_tokens, temperature, top_k, top_p, greedy, use_cache, generator,
            stop_ids, on_token):
    device = model_device(model)
    block_size = getattr(model, "block_size", None)
    total = idx.size(1) + max_new_tokens
    out = torch.empty(idx.size(0), total, dtype=torch.long, device=device)
    out[:, : idx.size(1)] = idx.to(device)
    length = idx.size(1)
    cache, cache_len = None, total if block_size is None else min(total, block_size)
    use_cache = use_cache and hasattr(model, "new_kv_cache")
    stop = torch.tensor(stop_ids, device=device) if stop_ids else None
    stopped = torch.zeros(out.size(0), dtype=torch.bool, device=device)

    for _ in range(max_new_tokens):
        if use_cache and length <= cache_len:
            if cache is None:                                  # prefill: the whole prompt at once
                cache = model.new_kv_cache(out.size(0), max_len=cache_len)
                logits, _ = model(out[:, :length], kv_cache=cache)
            else:                                              # one new token, keys from the cache
                logits, _ = model(out[:, length - 1: length], kv_cache=cache)
        else:                                                  # no cache, or the window slides
            start = 0 if block_size is None else max(0, length - block_size)
            logits, _ = model(out[:, start: length])
        next_logits = logits[:, -1, :]
        if greedy:
            token = next_logits.argmax(dim=-1)
        else:
            if generator is not None:                          # a CPU generator draws on the CPU
                next_logits = next_logits.cpu()
            token = sample_next(next_logits, temperature, top_k, top_p,
                                generator=generator)[:, 0].to(device)
        if stop is not None:
            token = torch.where(stopped, out[:, length - 1], token)
            stopped |= torch.isin(token, stop)
        out[:, length] = token
        length += 1
        if on_token is not None:
            on_token(token.clone())
        if stop is not None and bool(stopped.all()):
            break
    return out[:, :length]
