"""Attention, from one formula to the multi-head module a GPT block uses.

Read top to bottom:

1. :func:`attention_with_weights` -- softmax(Q K^T / sqrt(d_k)) V, written out, with an
   optional boolean mask (True = may attend, PyTorch's convention). It returns the weights too,
   so the chapters can draw them.
2. :func:`causal_mask` -- the lower-triangular mask that stops a position from seeing the future.
3. :func:`split_heads` / :func:`merge_heads` -- the reshapes that turn one wide attention into
   ``n_heads`` narrow ones and back.
4. Positions inside the attention: rotary embeddings (RoPE, Su et al. 2021) --
   :func:`rope_tables` (the cos/sin tables, Hugging Face's ``rotate_half`` layout),
   :func:`rotate_half` and :func:`apply_rope` (the rotation of q or k) -- and ALiBi (Press et
   al. 2022) -- :func:`alibi_slopes` (one slope per head) and :func:`alibi_bias` (the linear
   penalty added to the scores).
5. :class:`MultiHeadAttention` -- one fused q|k|v projection (``c_attn``, the layout GPT-2's
   weights use), attention per head, and an output projection (``c_proj``). Without weights
   requested it calls PyTorch's fused kernel; with them it runs the explicit function above.
   ``positions="rope"`` or ``"alibi"`` adds one of the two schemes of step 4.
   ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (Ainslie et al. 2023, Llama 2/3):
   fewer key/value heads, each shared by a group of query heads (:func:`repeat_kv_heads`).
   :meth:`MultiHeadAttention.from_torch` copies the weights of a ``torch.nn.MultiheadAttention``
   so the two can be compared.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import bool_mask, is_int, non_negative_int, positive_int

__all__ = [
    "attention_with_weights",
    "causal_mask",
    "split_heads",
    "merge_heads",
    "repeat_kv_heads",
    "rope_tables",
    "rotate_half",
    "apply_rope",
    "alibi_slopes",
    "alibi_bias",
    "MultiHeadAttention",
]


# -----------------------------------------------------------------------------
# the mask check shared by the function and the module

def _check_attention_mask(mask: torch.Tensor, scores_shape: torch.Size) -> None:
    """A mask must be a bool tensor that broadcasts to ``scores_shape`` (..., T_q, T_k) and
    must leave every query row at least one key to attend to."""
    bool_mask("mask", mask, scores_shape, broadcast=True,
              of="the attention scores (..., T_q, T_k)", meaning="True = may attend",
              empty_row="every key is masked out for those queries, and a softmax over no key "
                        "divides by zero (NaN): let every query attend to at least one key")


# -----------------------------------------------------------------------------
# 1. scaled dot-product attention

def attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None,
                                 bias: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d_k)) v, returning ``(output, weights)``.

    Unlike ``torch.nn.functional.scaled_dot_product_attention`` (one tensor, the output, from a
    fused kernel that never forms the weights), this spells the formula out and hands back the
    attention weights too, so they can be looked at; hence a different name.

    Shapes: ``q`` (..., T_q, d_k), ``k`` (..., T_k, d_k), ``v`` (..., T_k, d_v), with any
    number of leading batch dimensions (they broadcast). ``mask`` is an optional bool tensor
    that broadcasts against (..., T_q, T_k); True where a query may attend to a key.
    ``bias`` is an optional float tensor, broadcasting the same way, added to the scores
    before the mask and the softmax (ALiBi's penalty, :func:`alibi_bias`).
    Returns ``output`` (..., T_q, d_v) and ``weights`` (..., T_q, T_k), whose rows sum to 1.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., T, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same feature size d_k, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of positions T_k, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch) dimensions of q {tuple(q.shape)}, k {tuple(k.shape)} and "
            f"v {tuple(v.shape)} do not broadcast") from None

    d_k = q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d_k)            # (..., T_q, T_k)
    scores = scores.expand(*lead, *scores.shape[-2:])
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError(f"bias must be a floating-point tensor, got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)}")
        try:
            ok = torch.broadcast_shapes(bias.shape, scores.shape) == scores.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast against the "
                             f"attention scores of shape {tuple(scores.shape)} (..., T_q, T_k)")
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        _check_attention_mask(mask, scores.shape)
        scores = scores.masked_fill(~mask, float("-inf"))
    # numerically stable softmax: subtracting the row maximum changes nothing mathematically
    # but keeps exp() from overflowing; every row has a finite maximum (checked above)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    exp = scores.exp()                                                # masked entries: exp(-inf) = 0
    weights = exp / exp.sum(dim=-1, keepdim=True)
    return weights @ v, weights


# -----------------------------------------------------------------------------
# 2. masks

def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A (T, T) bool mask, True on and below the diagonal: position t may attend to 0..t."""
    positive_int("T", T)
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# -----------------------------------------------------------------------------
# 3. heads

def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(..., T, n_heads * head_dim) -> (..., n_heads, T, head_dim).

    Head h gets the features ``h*head_dim : (h+1)*head_dim`` of each position."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (..., T, C), got {getattr(x, 'shape', type(x).__name__)}")
    positive_int("n_heads", n_heads)
    *lead, T, C = x.shape
    if C % n_heads:
        raise ValueError(f"the feature size {C} of x {tuple(x.shape)} is not divisible by n_heads={n_heads}")
    return x.reshape(*lead, T, n_heads, C // n_heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., n_heads, T, head_dim) -> (..., T, n_heads * head_dim), the inverse of split_heads."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(
            f"x must be a tensor of shape (..., n_heads, T, head_dim), got {getattr(x, 'shape', type(x).__name__)}")
    *lead, h, T, hd = x.shape
    return x.transpose(-3, -2).reshape(*lead, T, h * hd)


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(..., n_kv_heads, T, head_dim) -> (..., n_kv_heads * n_rep, T, head_dim): each key/value
    head repeated ``n_rep`` times in place, so query head i reads key/value head i // n_rep
    (grouped-query attention; Hugging Face's ``repeat_kv``)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"x must be a tensor of shape (..., n_kv_heads, T, head_dim), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    positive_int("n_rep", n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=-3)


# -----------------------------------------------------------------------------
# 4. positions inside the attention: RoPE and ALiBi

def rope_tables(T: int, head_dim: int, start: int = 0, base: float = 10000.0,
                device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables ``(cos, sin)``, each (T, head_dim), for positions ``start .. start+T-1``.

    Feature pair i of a head -- features ``i`` and ``i + head_dim/2`` in Hugging Face's
    ``rotate_half`` layout (Llama, Mistral, ...) -- turns by the angle ``pos * base^(-2i/head_dim)``:
    fast turns in the first features, slow ones in the last. Both halves of a row hold the same
    angles, so ``cos[pos] = cat(cos(angles), cos(angles))``. ``head_dim`` must be even.
    """
    positive_int("T", T)
    positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE turns pairs of features), got {head_dim}")
    non_negative_int("start", start)
    if not base > 0:
        raise ValueError(f"base must be positive, got {base}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                               / head_dim))                               # (head_dim/2,)
    pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)                                   # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)                          # (T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: a quarter turn of every pair
    (x[i], x[i + d/2])."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be a tensor whose last axis is even, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every feature pair of ``x`` (..., T, head_dim) by its position's angle:
    ``x * cos + rotate_half(x) * sin``, with the tables of :func:`rope_tables` (T, head_dim).

    Applied to both q and k, the score q_m . k_n then depends on the positions only through
    m - n: the rotations of the two cancel up to the one by the distance."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor (..., T, head_dim), got {getattr(x, 'shape', type(x).__name__)}")
    if cos.shape != sin.shape or cos.shape != x.shape[-2:]:
        raise ValueError(f"cos and sin must both have shape (T, head_dim) = {tuple(x.shape[-2:])}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), a float32 tensor (n_heads,).

    For a power of two n, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8): head 0
    forgets fastest, the last head looks furthest back. Otherwise the slopes of the largest
    power of two below n, then every other slope of twice that many (the paper's code)."""
    positive_int("n_heads", n_heads)

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** int(math.floor(math.log2(n_heads)))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_heads: int, T_q: int, T_k: int | None = None, start: int | None = None,
               device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi's additive bias (n_heads, T_q, T_k): ``-slope_h * (i - j)`` for a query at
    position i and a key at position j, so a key d positions back costs ``slope_h * d``.

    Queries sit at positions ``start .. start+T_q-1`` and keys at ``0 .. T_k-1`` (with a cache,
    ``start`` is how many positions it held before; by default ``start = T_k - T_q``, the last
    T_q positions). Future keys (j > i) get a positive bias: the causal mask must remove them."""
    positive_int("n_heads", n_heads)
    positive_int("T_q", T_q)
    T_k = T_q if T_k is None else positive_int("T_k", T_k)
    start = T_k - T_q if start is None else start
    if not is_int(start) or start < 0:
        raise ValueError(f"start must be a non-negative int (and T_k >= T_q by default), got "
                         f"{start!r}")
    q_pos = torch.arange(start, start + T_q, device=device, dtype=torch.float32)
    k_pos = torch.arange(T_k, device=device, dtype=torch.float32)
    distance = q_pos[:, None] - k_pos[None, :]                               # (T_q, T_k)
    slopes = alibi_slopes(n_heads).to(device)
    return (-slopes[:, None, None] * distance).to(dtype)


# -----------------------------------------------------------------------------
# 5. the multi-head module

class MultiHeadAttention(nn.Module):
    """Multi-head self-attention on (batch, T, d_model).

    ``c_attn`` is one Linear(d_model, 3*d_model) whose outputs are q | k | v (GPT-2's layout);
    ``c_proj`` is the output projection W^O. With ``causal=True`` position t sees only 0..t.

    ``positions``: None (the default: the attention itself knows no order; a GPT adds positions
    to its embeddings), ``"rope"`` (q and k rotated by :func:`apply_rope`, ``rope_base`` the
    base of its angles) or ``"alibi"`` (:func:`alibi_bias` added to the scores). Neither adds a
    parameter. With a cache, the positions continue at the cache's start.

    ``n_kv_heads`` (default ``n_heads``): how many key/value heads. Fewer than ``n_heads`` is
    grouped-query attention: ``c_attn`` then gives q (n_heads heads) | k | v (n_kv_heads heads
    each), a cache holds n_kv_heads heads, and each key/value head serves n_heads / n_kv_heads
    query heads (:func:`repeat_kv_heads`). ``n_kv_heads=1`` is multi-query attention.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, causal: bool = False,
                 dropout: float = 0.0, positions: str | None = None, rope_base: float = 10000.0,
                 n_kv_heads: int | None = None):
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: "
                             f"every key/value head must serve the same number of query heads")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if positions not in (None, "rope", "alibi"):
            raise ValueError(f"positions must be None, 'rope' or 'alibi', got {positions!r}")
        if positions == "rope" and (d_model // n_heads) % 2:
            raise ValueError(f"RoPE turns pairs of features: head_dim = d_model // n_heads = "
                             f"{d_model // n_heads} must be even")
        if not (isinstance(rope_base, (int, float)) and not isinstance(rope_base, bool)
                and rope_base > 0):
            raise ValueError(f"rope_base must be a positive number, got {rope_base!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_kv_heads = n_kv_heads
        self.causal, self.dropout = causal, dropout
        self.positions, self.rope_base = positions, float(rope_base)
        kv_width = n_kv_heads * self.head_dim                      # = d_model without GQA
        self.c_attn = nn.Linear(d_model, d_model + 2 * kv_width, bias=bias)  # W^Q | W^K | W^V
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)       # W^O
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        extra = f", positions={self.positions!r}" if self.positions else ""
        if self.n_kv_heads != self.n_heads:
            extra += f", n_kv_heads={self.n_kv_heads}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}{extra}"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False, kv: tuple | None = None):
        """``x`` (batch, T, d_model) -> (batch, T, d_model); with ``return_weights=True``
        also the per-head attention weights (batch, n_heads, T, T).

        ``mask``: optional bool tensor, True = may attend, broadcasting against
        (batch, n_heads, T, T), e.g. (T, T) or a padding mask (batch, 1, 1, T). With
        ``causal=True`` it is combined with the causal mask.

        ``kv``: a key/value cache for generation, ``(k_buffer, v_buffer, start)`` with buffers
        of shape (batch, n_kv_heads, max_len, head_dim): the new keys and values are written at
        positions ``start .. start+T-1`` and the queries attend to everything up to there."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (batch, T, d_model={self.d_model}), got {getattr(x, 'shape', type(x).__name__)}")
        B, T, C = x.shape
        # one projection gives q | k | v for all heads; view it as (B, T, h + 2 kv, hd), move
        # the heads before T and cut it into h query heads, kv key heads and kv value heads:
        # the same as split_heads on each part, in fewer steps
        h, kv_h = self.n_heads, self.n_kv_heads
        qkv = self.c_attn(x).view(B, T, h + 2 * kv_h, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split((h, kv_h, kv_h), dim=1)        # (B, h, T, hd), k, v (B, kv, T, hd)
        start = kv[2] if kv is not None else 0          # where these positions begin
        if self.positions == "rope":                    # turn q and k by their positions
            cos, sin = self._rope(T, start, q)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv is not None:
            if mask is not None or return_weights or not self.causal:
                raise ValueError("the key/value cache is for causal generation: no extra mask, no weights")
            y = self._attend_with_cache(q, k, v, kv)
            return self._project_out(y)
        k, v = repeat_kv_heads(k, h // kv_h), repeat_kv_heads(v, h // kv_h)   # (B, h, T, hd)

        scores_shape = torch.Size((B, self.n_heads, T, T))
        if mask is not None:
            _check_attention_mask(mask, scores_shape)        # the caller's mask, as given
        bias = (alibi_bias(self.n_heads, T, device=x.device, dtype=q.dtype)
                if self.positions == "alibi" else None)      # (h, T, T)
        fused_causal = self.causal and mask is None and not return_weights and bias is None
        if self.causal and not fused_causal:
            causal = causal_mask(T, device=x.device)
            if mask is None:
                mask = causal
            else:                                            # combined, a row may end up empty
                mask = mask & causal
                _check_attention_mask(mask, scores_shape)

        if return_weights:   # the explicit path: we need the weights to look at them
            y, weights = attention_with_weights(q, k, v, mask, bias=bias)
            if self.training and self.dropout > 0:   # dropout acts on the weights, not on y
                y = self.attn_dropout(weights) @ v
        else:                # the fused path: same numbers, one PyTorch kernel
            p = self.dropout if self.training else 0.0
            if fused_causal:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                if bias is not None:                     # one float mask: bias, -inf where masked
                    mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None

        y = self._project_out(y)                                          # (B, T, C)
        return (y, weights) if return_weights else y

    def _rope(self, T: int, start: int, like: torch.Tensor):
        """RoPE's tables for positions start..start+T-1, kept while the same ones come back
        (every training step asks for the same T): a cache, not state."""
        key = (T, start, like.device, like.dtype)
        if getattr(self, "_rope_key", None) != key:
            self._rope_tables = rope_tables(T, self.head_dim, start, self.rope_base,
                                            device=like.device, dtype=like.dtype)
            self._rope_key = key
        return self._rope_tables

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        """Heads merged back, W^O, and dropout (in training only: a no-op costs a call too)."""
        y = self.c_proj(merge_heads(y))
        return self.resid_dropout(y) if self.training else y

    def _attend_with_cache(self, q, k, v, kv):
        """Write this step's keys and values into the cache, then attend over all of it."""
        k_buf, v_buf, start = kv
        if k_buf.shape[0] != q.shape[0]:
            raise ValueError(f"the cache was built for a batch of {k_buf.shape[0]}, got a batch of {q.shape[0]}")
        T = q.shape[-2]
        end = start + T
        if end > k_buf.shape[-2]:
            raise ValueError(f"the cache holds {k_buf.shape[-2]} positions; positions {start}..{end - 1} do not fit")
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        k, v = k_buf[:, :, :end], v_buf[:, :, :end]
        n_rep = self.n_heads // self.n_kv_heads       # the cache holds the kv heads only
        k, v = repeat_kv_heads(k, n_rep), repeat_kv_heads(v, n_rep)
        if self.positions == "alibi":    # queries at start..end-1, keys at 0..end-1
            bias = alibi_bias(self.n_heads, T, end, start=start, device=q.device, dtype=q.dtype)
            if T > 1:
                allowed = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
                bias = bias.masked_fill(~allowed, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if T == 1:                       # one new token may see every cached position
            return F.scaled_dot_product_attention(q, k, v)
        if start == 0:                   # a prompt on an empty cache: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        allowed = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, causal: bool = False) -> "MultiHeadAttention":
        """A MultiHeadAttention holding the weights of a ``torch.nn.MultiheadAttention``
        (``batch_first=True``, self-attention with one in_proj_weight, no bias_k/bias_v)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if not module.batch_first:
            raise ValueError("expected a torch.nn.MultiheadAttention built with batch_first=True")
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            raise ValueError("expected kdim == vdim == embed_dim (one packed in_proj_weight)")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        bias = module.in_proj_bias is not None
        w = module.in_proj_weight
        new = cls(module.embed_dim, module.num_heads, bias=bias, causal=causal,
                  dropout=module.dropout).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.c_attn.weight.copy_(w)                       # rows: W^Q, then W^K, then W^V
            new.c_proj.weight.copy_(module.out_proj.weight)
            if bias:
                new.c_attn.bias.copy_(module.in_proj_bias)
                new.c_proj.bias.copy_(module.out_proj.bias)
        return new.train(module.training)
