"""The pieces of a GPT, read top to bottom (in the spirit of nanoGPT's model.py).

1. Position encodings: :func:`sinusoidal_positions` (the fixed sin/cos table of
   "Attention Is All You Need") and :class:`LearnedPositions` (GPT-2's learned table).
2. :class:`MLP` -- Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout.
3. :class:`Block` -- the pre-LayerNorm Transformer block:
   ``x = x + attn(ln_1(x))`` then ``x = x + mlp(ln_2(x))``.

Parameter names follow GPT-2's (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``) so its weights can be loaded by name.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from .attention import MultiHeadAttention

__all__ = ["sinusoidal_positions", "LearnedPositions", "MLP", "Block"]


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# -----------------------------------------------------------------------------
# 1. position encodings

def sinusoidal_positions(T: int, d: int, base: float = 10000.0,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (T, d) table of Vaswani et al. (2017):

        PE[pos, 2i]   = sin(pos / base^(2i/d))
        PE[pos, 2i+1] = cos(pos / base^(2i/d))

    Each pair of columns is a rotation at its own frequency, from one turn every 2*pi
    positions (i = 0) down to one every 2*pi*base positions. ``d`` must be even.
    """
    _positive_int("T", T)
    _positive_int("d", d)
    if d % 2:
        raise ValueError(f"d must be even (sin and cos come in pairs), got d={d}")
    if not base > 0:
        raise ValueError(f"base must be positive, got {base}")
    pos = torch.arange(T, device=device, dtype=torch.float64)[:, None]            # (T, 1)
    inv_freq = base ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)  # (d/2,)
    angle = pos * inv_freq                                                       # (T, d/2)
    pe = torch.empty(T, d, device=device, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.to(dtype)


class LearnedPositions(nn.Module):
    """A learned table of ``block_size`` position vectors (GPT-2's ``wpe``).

    ``forward(T)`` returns rows ``0..T-1`` as a (T, d) tensor. It also accepts a tensor:
    token ids (..., T) (an integer tensor) or embeddings (..., T, d) (a float tensor).
    ``start`` shifts the positions (for decoding with a cache: ``start .. start+T-1``).
    """

    def __init__(self, block_size: int, d: int):
        super().__init__()
        _positive_int("block_size", block_size)
        _positive_int("d", d)
        self.block_size = block_size
        self.weight = nn.Parameter(torch.randn(block_size, d) * 0.02)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, d={self.weight.shape[1]}"

    def forward(self, x: int | torch.Tensor, start: int = 0) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ValueError("expected an int T or a tensor with a positions axis, got a 0-d tensor")
            T = x.shape[-1] if not x.is_floating_point() else x.shape[-2] if x.dim() >= 2 else None
            if T is None:
                raise ValueError(f"a float tensor must have shape (..., T, d), got {tuple(x.shape)}")
        else:
            T = x
        _positive_int("T", T)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        if start + T > self.block_size:
            raise ValueError(
                f"positions {start}..{start + T - 1} do not fit in block_size={self.block_size}: "
                "the table has no vector for them")
        return self.weight[start:start + T]


# -----------------------------------------------------------------------------
# 2. the feed-forward network

class MLP(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout, applied to each position alone.

    GELU uses the tanh approximation, the one GPT-2 was trained with."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


# -----------------------------------------------------------------------------
# 3. the Transformer block

class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    ``causal=True`` (the default, a decoder such as GPT) lets position t see only 0..t;
    ``causal=False`` gives an encoder block that sees the whole sequence.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True):
        super().__init__()
        _positive_int("n_embd", n_embd)
        _positive_int("n_head", n_head)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = MultiHeadAttention(n_embd, n_head, bias=bias, causal=causal, dropout=dropout)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False):
        """``x`` (batch, T, n_embd) -> same shape; with ``return_weights=True`` also the
        attention weights (batch, n_head, T, T). ``mask`` is passed to the attention."""
        n_embd = self.attn.d_model
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != n_embd:
            raise ValueError(
                f"x must have shape (batch, T, n_embd={n_embd}), got {getattr(x, 'shape', type(x).__name__)}")
        if return_weights:
            a, weights = self.attn(self.ln_1(x), mask=mask, return_weights=True)
        else:
            a = self.attn(self.ln_1(x), mask=mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return (x, weights) if return_weights else x
