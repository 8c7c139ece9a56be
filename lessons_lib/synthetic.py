"""Generated tasks whose answers are known exactly, for experiments that need a clean signal."""

from __future__ import annotations

import torch


def copy_task(batch_size: int, n_copy: int, vocab_size: int, generator: torch.Generator | None = None):
    """Sequences ``x_1 .. x_n DELIM x_1 .. x_n``: after the delimiter the model must repeat the
    first half. Symbols are ``0 .. vocab_size - 1``; the delimiter is ``vocab_size``, so a model
    needs ``vocab_size + 1`` embeddings.

    Returns ``(inputs, targets)`` of shape ``(batch_size, 2 * n_copy)``; targets are inputs
    shifted by one, with ``-100`` (PyTorch's ignore index) everywhere except the copied half.
    """
    if batch_size < 1 or n_copy < 1 or vocab_size < 2:
        raise ValueError(f"need batch_size >= 1, n_copy >= 1 and vocab_size >= 2, "
                         f"got {batch_size}, {n_copy}, {vocab_size}")
    symbols = torch.randint(vocab_size, (batch_size, n_copy), generator=generator)
    delim = torch.full((batch_size, 1), vocab_size)
    seq = torch.cat([symbols, delim, symbols], dim=1)          # (B, 2n + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : n_copy] = -100                                 # nothing to predict before the delimiter
    return inputs, targets
