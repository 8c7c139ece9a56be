"""Bigram language models: predict the next token from the current token alone.

A bigram model is one table ``P[i, j] = P(next token is j | current token is i)``, of shape
``(V, V)`` for a vocabulary of ``V`` tokens. Chapter 1 builds the table in two ways that end
up in the same place:

* **counting**: ``bigram_counts`` counts how often ``j`` follows ``i`` in the training text,
  and ``bigram_probs`` turns each row of counts into probabilities (with add-``k`` smoothing,
  so that a pair never seen in training does not get probability zero);
* **learning**: ``BigramLanguageModel`` is an ``nn.Embedding(V, V)`` whose row ``i`` holds the
  *logits* of the next token after ``i``; trained by gradient descent on the cross-entropy
  loss, ``softmax(row i)`` approaches the counted row ``i``, because both maximise the
  likelihood of the training text.

``bigram_nll`` scores a table on a sequence (mean negative log-likelihood in nats per token),
``perplexity`` turns such a loss into an "effective number of choices", and ``sample_bigram``
generates text from a table, one token at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import is_int, is_integer_dtype, non_negative_int, positive_int, token_ids
from .generate import generate
from .model import next_token_loss

# -----------------------------------------------------------------------------
# input checks shared by the functions below


def _check_ids(ids, vocab_size: int | None = None, min_len: int = 2) -> torch.Tensor:
    """Return ``ids`` as a 1-D int64 tensor, or raise a ValueError that says what was wrong."""
    if not isinstance(ids, torch.Tensor):
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise ValueError(f"ids must be a 1-D tensor or a list of integer token ids, "
                             f"got {type(ids).__name__}")
        if not all(is_int(i) for i in ids):
            raise ValueError("ids must hold integer token ids (a list of ints or an integer tensor)")
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D (one sequence of token ids), got shape {tuple(ids.shape)}")
    if not is_integer_dtype(ids.dtype):
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if len(ids) < min_len:
        raise ValueError(f"need at least {min_len} token ids (a pair is a token and the one after it), "
                         f"got {len(ids)}")
    if vocab_size is not None and len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1} for a vocabulary of {vocab_size}, "
                         f"got values from {ids.min().item()} to {ids.max().item()}")
    return ids.long()


def _check_table(table, name: str) -> torch.Tensor:
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (V, V), got {type(table).__name__}")
    if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] == 0:
        raise ValueError(f"{name} must be a square (V, V) table, got shape {tuple(table.shape)}")
    if table.dtype == torch.bool or table.dtype.is_complex:
        raise ValueError(f"{name} must hold real numbers, got dtype {table.dtype}")
    if (table < 0).any():
        raise ValueError(f"{name} must not hold negative entries")
    return table


# -----------------------------------------------------------------------------
# the counting model


def bigram_counts(ids, vocab_size: int) -> torch.Tensor:
    """Count every pair of neighbouring tokens: ``counts[i, j]`` = how often ``j`` follows ``i``.

    ``ids`` is one sequence of token ids (a 1-D integer tensor or a list of ints) with at least
    two tokens. Returns an int64 tensor of shape ``(vocab_size, vocab_size)`` whose entries sum
    to ``len(ids) - 1``: rows are the current token, columns the next one.
    """
    vocab_size = positive_int("vocab_size", vocab_size)
    ids = _check_ids(ids, vocab_size)
    # each pair (i, j) gets one flat index i * V + j; bincount counts them all at once
    flat = ids[:-1] * vocab_size + ids[1:]
    return torch.bincount(flat, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)


def bigram_probs(counts: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """Turn a ``(V, V)`` table of counts into conditional probabilities, one row per token.

    Every count first gets ``smoothing`` added (Laplace's add-one rule when it is 1), so a pair
    never seen in training keeps a small probability instead of zero. Returns a float32 table
    whose rows sum to 1: ``probs[i, j] = (counts[i, j] + k) / sum_j' (counts[i, j'] + k)``.
    """
    counts = _check_table(counts, "counts")
    if not (isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)) \
            or not math.isfinite(smoothing) or smoothing < 0:
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
    table = counts.double() + smoothing
    totals = table.sum(dim=1, keepdim=True)
    empty = (totals[:, 0] == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"row {empty[0].item()} of counts is all zero, so its probabilities are "
                         f"undefined (0/0); use smoothing > 0")
    return (table / totals).float()


def bigram_nll(probs: torch.Tensor, ids) -> float:
    """Mean negative log-likelihood of ``ids`` under a bigram table, in nats per predicted token.

    Each of the ``len(ids) - 1`` predictions costs ``-ln probs[current, next]``; a pair with
    probability zero costs infinity (smooth the table to avoid it).
    """
    probs = _check_table(probs, "probs")
    ids = _check_ids(ids, probs.shape[0])
    picked = probs.double()[ids[:-1], ids[1:]]          # P(next | current) at every position
    return float(-picked.log().mean())


def perplexity(loss) -> float:
    """``exp(loss)`` for a loss in nats: the number of equally likely choices that would be as
    uncertain as the model. A uniform model over ``V`` tokens has perplexity exactly ``V``."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a single number, got a tensor of shape {tuple(loss.shape)}")
        loss = loss.item()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ValueError(f"loss must be a number, got {type(loss).__name__}")
    if math.isnan(loss) or loss < 0:
        raise ValueError(f"a negative log-likelihood of discrete tokens is >= 0, got {loss}")
    return math.exp(loss) if loss < 709.0 else math.inf


def sample_bigram(probs: torch.Tensor, start: int, num_tokens: int,
                  generator: torch.Generator | None = None) -> list[int]:
    """Generate ``num_tokens`` ids after ``start``: each one is drawn from the row of the one before.

    Returns the new ids only (``start`` is not included). Pass a seeded ``torch.Generator`` on
    the table's device to make the draw repeatable.
    """
    probs = _check_table(probs, "probs")
    if not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be a floating-point table, got dtype {probs.dtype}")
    vocab_size = probs.shape[0]
    if not is_int(start) or not 0 <= start < vocab_size:
        raise ValueError(f"start must be a token id in 0..{vocab_size - 1}, got {start!r}")
    non_negative_int("num_tokens", num_tokens)
    out, current = [], start
    for _ in range(num_tokens):
        current = int(torch.multinomial(probs[current], 1, generator=generator))
        out.append(current)
    return out


# -----------------------------------------------------------------------------
# the neural model


class BigramLanguageModel(nn.Module):
    """The bigram as a neural network: a ``(V, V)`` table of logits, learned by gradient descent.

    ``forward(idx)`` looks up one row per input token: the logits of the token that comes next.
    With ``targets`` it also returns the mean cross-entropy loss, as every language model in
    this course does.
    """

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.block_size = 1             # the next token depends on the last one only
        self.logits_table = nn.Embedding(vocab_size, vocab_size)   # row i: logits of what follows i

    def _check_idx(self, idx, name: str) -> None:
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"{name} must be an integer tensor of token ids, got {type(idx).__name__}")
        token_ids(idx, name, ndim=None, vocab_size=self.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """``idx`` of any shape, e.g. ``(batch, time)`` -> logits of shape ``(*idx.shape, V)``
        and the mean cross-entropy against ``targets`` (same shape as ``idx``), or None."""
        self._check_idx(idx, "idx")
        logits = self.logits_table(idx.long())        # any integer dtype; Embedding wants int64
        if targets is None:
            return logits, None
        # -100 marks a position not to score; the shape is checked by next_token_loss
        scored = targets[targets != -100] if isinstance(targets, torch.Tensor) else targets
        self._check_idx(scored, "targets")
        return logits, next_token_loss(logits, targets)

    def probs(self) -> torch.Tensor:
        """The model's ``(V, V)`` table of conditional probabilities: softmax of every row."""
        return F.softmax(self.logits_table.weight.detach(), dim=-1)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend every row of ``idx`` (shape ``(batch, time)``) by ``max_new_tokens`` sampled ids.

        A bigram only ever looks at the last token, so that is all we feed it.
        """
        self._check_idx(idx, "idx")
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
        non_negative_int("max_new_tokens", max_new_tokens)
        return generate(self, idx, max_new_tokens, generator=generator)   # block_size 1
