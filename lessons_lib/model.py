"""The pieces of a GPT, read top to bottom (in the spirit of nanoGPT's model.py).

1. Position encodings: :func:`sinusoidal_positions` (the fixed sin/cos table of
   "Attention Is All You Need") and :class:`LearnedPositions` (GPT-2's learned table). Two
   more schemes live inside the attention (lessons_lib.attention): RoPE and ALiBi.
2. :class:`MLP` -- Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout.
3. :class:`Block` -- the pre-LayerNorm Transformer block:
   ``x = x + attn(ln_1(x))`` then ``x = x + mlp(ln_2(x))``.
4. :class:`GPTConfig`, :func:`count_parameters` (a GPT's parameters from its config),
   :func:`num_parameters` (any built model's), :func:`next_token_loss` (the loss of every
   lessons_lib language model), :class:`KVCache`, :class:`DecoderLM` (what the GPT and
   lessons_lib.llama's Llama share: initialisation, ``block_size``, the parameter count, the
   cache) and :class:`GPT` -- token and position embeddings, ``n_layer`` blocks, a final
   LayerNorm and the output head; the GPT-1/2/3 configurations; loading Hugging Face GPT-2
   checkpoints.

Parameter names follow GPT-2's (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``) so its weights can be loaded by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors

from .attention import MultiHeadAttention
from .checks import non_negative_int, positive_int, token_ids

__all__ = ["sinusoidal_positions", "LearnedPositions", "MLP", "Block",
           "GPTConfig", "count_parameters", "num_parameters", "next_token_loss", "KVCache",
           "DecoderLM", "GPT", "LanguageModel"]


@runtime_checkable
class LanguageModel(Protocol):
    """What every language model of the course is (GPT, Llama, the bigram, the LSTM, the
    attention-only Transformer, MixerLM), and all that training, evaluation and
    :func:`lessons_lib.generate.generate` rely on:

    - ``model(idx, targets=None) -> (logits, loss)``: ``idx`` (batch, T) token ids, ``logits``
      (batch, T, vocab_size), the next token's scores at every position; ``loss`` the mean
      cross-entropy against ``targets`` (batch, T) (-100 not counted), or None without them;
    - ``block_size``: the most tokens it reads at once (None: any number).

    Optional: ``new_kv_cache(batch_size, max_len)`` and ``model(idx, kv_cache=cache)`` for
    generation one token at a time (GPT, Llama).
    """

    block_size: int | None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None): ...


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
    positive_int("T", T)
    positive_int("d", d)
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
        positive_int("block_size", block_size)
        positive_int("d", d)
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
        positive_int("T", T)
        non_negative_int("start", start)
        if start + T > self.block_size:
            raise ValueError(
                f"positions {start}..{start + T - 1} do not fit in block_size={self.block_size}: "
                "the table has no vector for them")
        return self.weight[start:start + T]


# -----------------------------------------------------------------------------
# 2. the feed-forward network

class MLP(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout, position by position.

    GELU uses the tanh approximation, the one GPT-2 was trained with."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_proj(self.gelu(self.c_fc(x)))
        return self.dropout(x) if self.training else x  # eval: no dropout


# -----------------------------------------------------------------------------
# 3. the Transformer block

class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    ``causal=True`` (the default, a decoder such as GPT) lets position t see
    only 0..t; ``causal=False`` gives an encoder block that sees everything.
    ``positions`` ("rope", "alibi" or None) goes to the attention.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0,
                 bias: bool = True, causal: bool = True,
                 positions: str | None = None):
        super().__init__()
        positive_int("n_embd", n_embd)
        positive_int("n_head", n_head)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = MultiHeadAttention(n_embd, n_head, bias=bias,
                                       causal=causal, dropout=dropout,
                                       positions=positions)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_weights: bool = False, kv: tuple | None = None):
        """``x`` (batch, T, n_embd) -> same shape; with ``return_weights``
        also the attention weights (batch, n_head, T, T). ``mask`` and ``kv``
        (one layer of a :class:`KVCache`) go to the attention, which refuses
        weights and a cache at once (ValueError)."""
        n_embd = self.attn.d_model
        if (not isinstance(x, torch.Tensor) or x.dim() != 3
                or x.shape[-1] != n_embd):
            got = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"x must have shape (batch, T, n_embd={n_embd}), "
                             f"got {got}")
        if return_weights:
            a, weights = self.attn(self.ln_1(x), mask=mask,
                                   return_weights=True, kv=kv)
        else:
            a = self.attn(self.ln_1(x), mask=mask, kv=kv)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return (x, weights) if return_weights else x


# -----------------------------------------------------------------------------
# 4. the GPT: token and position embeddings, a stack of blocks, a final LayerNorm, the head

POSITION_SCHEMES = ("learned", "sinusoidal", "none", "rope", "alibi")

@dataclass
class GPTConfig:
    """The sizes of a decoder-only GPT. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50257
    block_size: int = 1024          # the longest context the model can see
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True               # biases in Linear layers and LayerNorms, as in GPT-2
    tie_weights: bool = True        # the output head reuses the token embedding matrix
    # where the order of the tokens comes from: "learned" (GPT-2's wpe) or "sinusoidal"
    # (a fixed table) added to the embeddings; "rope" or "alibi" inside the attention;
    # "none" (only the causal mask tells positions apart)
    positions: str = "learned"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}: each head gets n_embd // n_head features")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"GPTConfig.positions must be one of {POSITION_SCHEMES}, "
                             f"got {self.positions!r}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig.positions='rope' turns pairs of features: the head "
                             f"size n_embd // n_head = {self.n_embd // self.n_head} must be even")

    @classmethod
    def gpt1(cls) -> "GPTConfig":
        """GPT-1 (Radford et al., 2018): 12 layers, 768 wide, 12 heads, 512 positions, a
        40,478-token BPE vocabulary. (GPT-1 normalised after each sub-block, post-LN; the
        parameter count differs from ours only by the final LayerNorm, 1,536 parameters.)"""
        return cls(vocab_size=40478, block_size=512, n_layer=12, n_head=12, n_embd=768)

    @classmethod
    def gpt2(cls, size: str = "small") -> "GPTConfig":
        """GPT-2 (Radford et al., 2019): "small" (124M), "medium" (355M), "large" (774M), "xl" (1.5B)."""
        sizes = {"small": (12, 12, 768), "medium": (24, 16, 1024),
                 "large": (36, 20, 1280), "xl": (48, 25, 1600)}
        if size not in sizes:
            raise ValueError(f"GPT-2 sizes are {list(sizes)}, got {size!r}")
        n_layer, n_head, n_embd = sizes[size]
        return cls(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)

    @classmethod
    def gpt3(cls, name: str = "175b") -> "GPTConfig":
        """The eight models of the GPT-3 paper (Brown et al., 2020, table 2.1), context 2048.

        Two rows of the table do not multiply out. XL: 24 heads of 128 are 3072, not the width
        2048; we keep the width and take 16 heads of 128. 13B: 40 heads of 128 are 5120, not
        5140; we keep the table's 5140 for counting, with 20 heads of 257. The number of heads
        does not change the parameter count; it must divide the width to build a model."""
        table = {"small": (12, 12, 768), "medium": (24, 16, 1024), "large": (24, 16, 1536),
                 "xl": (24, 16, 2048), "2.7b": (32, 32, 2560), "6.7b": (32, 32, 4096),
                 "13b": (40, 20, 5140), "175b": (96, 96, 12288)}
        if name not in table:
            raise ValueError(f"GPT-3 models are {list(table)}, got {name!r}")
        n_layer, n_head, n_embd = table[name]
        return cls(vocab_size=50257, block_size=2048, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The parameters of any ``model``, each tensor counted once (tied weights are one tensor);
    with ``trainable_only`` only those with ``requires_grad``. Every count in lessons_lib of a
    built model comes from here; :func:`count_parameters` counts a GPT from its config alone."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of every lessons_lib language model: the mean cross-entropy of ``logits``
    (..., vocab_size) against the integer ``targets`` (...), -100 marking positions to ignore,
    computed in float32."""
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have the shape of idx {tuple(logits.shape[:-1])}, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    token_ids(targets, "targets", ndim=None)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1).long(),
                           ignore_index=-100)


def count_parameters(config: GPTConfig, split: bool = False):
    """The exact number of parameters of ``GPT(config)``, from the formula, allocating nothing.

    With ``split=True`` returns a dict: embeddings (tokens + positions), attention, MLP,
    layernorm and head (0 when tied), and their total.
    """
    if not isinstance(config, GPTConfig):
        raise ValueError(f"expected a lessons_lib.model.GPTConfig, got {type(config).__name__}")
    d, V, L, b = config.n_embd, config.vocab_size, config.n_layer, int(config.bias)
    embeddings = V * d + (config.block_size * d if config.positions == "learned" else 0)
    attention = L * (d * 3 * d + 3 * d * b + d * d + d * b)          # c_attn and c_proj
    mlp = L * (d * 4 * d + 4 * d * b + 4 * d * d + d * b)            # c_fc and c_proj
    layernorm = (2 * L + 1) * (d + d * b)                              # ln_1, ln_2 per block; ln_f
    head = 0 if config.tie_weights else V * d
    parts = {"embeddings": embeddings, "attention": attention, "mlp": mlp,
             "layernorm": layernorm, "head": head}
    total = sum(parts.values())
    return {**parts, "total": total} if split else total


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, batch, n_kv_head, max_len,
    head_dim), with ``n_kv_head = config.n_kv_head`` for grouped-query attention (Llama) and
    ``config.n_head`` where every query head has its own keys and values (GPT).

    The cache owns its position: ``pos`` (read-only) is how many positions are filled. A model
    calls :meth:`start` before a forward pass (it checks that the batch is the one the cache was
    built for and that the new positions fit, and returns where they begin), :meth:`layer` for
    each block, and :meth:`advance` after it. :meth:`reset` empties the cache for a new prompt.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        positive_int("batch_size", batch_size)
        max_len = config.block_size if max_len is None else positive_int("max_len", max_len)
        head_dim = config.n_embd // config.n_head
        n_kv_head = getattr(config, "n_kv_head", config.n_head)
        shape = (config.n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.max_len = max_len
        self._pos = 0

    @property
    def nbytes(self) -> int:
        """Bytes the keys and values of every layer take."""
        return self.k.nbytes + self.v.nbytes

    @property
    def pos(self) -> int:
        """How many positions hold keys and values: the next tokens start here."""
        return self._pos

    def start(self, batch_size: int, T: int) -> int:
        """Check that ``T`` new positions of a batch of ``batch_size`` fit; return where they start."""
        if batch_size != self.batch_size:
            raise ValueError(f"the cache was built for a batch of {self.batch_size}, got a batch of "
                             f"{batch_size}: make a cache per batch (model.new_kv_cache(batch_size))")
        if self._pos + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; positions {self._pos}.."
                             f"{self._pos + T - 1} do not fit")
        return self._pos

    def layer(self, i: int):
        """What layer ``i``'s attention needs: its key buffer, value buffer and the start position."""
        return self.k[i], self.v[i], self._pos

    def advance(self, T: int) -> None:
        """Mark ``T`` more positions as filled (after every layer has written them)."""
        self.start(self.batch_size, T)
        self._pos += T

    def reset(self) -> None:
        """Forget every position: the next forward pass starts at position 0."""
        self._pos = 0


class DecoderLM(nn.Module):
    """What :class:`GPT` and :class:`lessons_lib.llama.Llama` share around their blocks: a
    ``config`` with ``block_size`` (and the sizes a :class:`KVCache` reads), the token
    embedding ``wte`` (a new cache takes its device and dtype), GPT-2's initialisation and the
    parameter count. A subclass builds its modules, then calls ``self.apply(self._init_weights)``.
    """

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, LearnedPositions):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def num_parameters(self) -> int:
        """Parameters counted once each (tied weights are one tensor): :func:`num_parameters`."""
        return num_parameters(self)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)


class GPT(DecoderLM):
    """A decoder-only Transformer language model with GPT-2's layout and names."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config           # GPTConfig has checked n_embd % n_head == 0
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = LearnedPositions(config.block_size, config.n_embd)
        elif config.positions == "sinusoidal":
            table = sinusoidal_positions(config.block_size, config.n_embd)
            self.register_buffer("sinusoid", table, persistent=False)
        # "rope" and "alibi" act inside every attention; "none" adds nothing anywhere
        in_attention = config.positions if config.positions in ("rope", "alibi") else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(
            [Block(config.n_embd, config.n_head, config.dropout, config.bias,
                   positions=in_attention)
             for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections into the residual stream by
        # 1/sqrt(2 * n_layer): two residual additions per layer
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    def hidden_states(self, idx: torch.Tensor,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """``idx`` (batch, T) token ids -> the final LayerNorm's output
        (batch, T, n_embd): what the head reads (and a reward model's or a
        value head's scalar head, chapter 10). With ``kv_cache`` the tokens
        continue the cached sequence at ``kv_cache.pos``.
        """
        token_ids(idx, "idx")
        B, T = idx.shape
        cached = kv_cache is not None
        start = kv_cache.pos if cached else 0
        limit = kv_cache.max_len if cached else self.config.block_size
        if T == 0 or start + T > min(limit, self.config.block_size):
            raise ValueError(
                f"sequence of length {T} at position {start} does not fit "
                f"the model's block_size={self.config.block_size}"
                + (f" or the cache's {limit} positions" if cached else ""))
        if cached:
            kv_cache.start(B, T)          # checks the batch the cache holds
        token_ids(idx, "idx", vocab_size=self.config.vocab_size)
        idx = idx.long()             # any integer dtype; Embedding wants int64

        x = self.wte(idx)
        if self.config.positions == "learned":
            x = x + self.wpe(T, start=start)
        elif self.config.positions == "sinusoidal":
            x = x + self.sinusoid[start:start + T]
        if self.training:
            x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, kv=kv_cache.layer(i) if cached else None)
        if cached:
            kv_cache.advance(T)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None):
        """``idx`` (batch, T) token ids -> ``(logits (batch, T, vocab), loss)``.

        ``targets`` (batch, T) gives the cross-entropy loss (-100 marks
        positions to ignore); without them ``loss`` is None. With ``kv_cache``
        the tokens continue the cached sequence at ``kv_cache.pos``.
        """
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits, None
        return logits, next_token_loss(logits, targets)

    @classmethod
    def from_hf_gpt2(cls, path) -> "GPT":
        """Load a folder in Hugging Face's GPT-2 format (``config.json`` and ``model.safetensors``,
        or ``pytorch_model.bin``) into our model. Keys may carry the ``transformer.`` prefix;
        GPT-2's Conv1D layers store weights as (in, out), so they are transposed."""
        folder = Path(path)
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise ValueError(f"{folder} has no config.json: expected a Hugging Face GPT-2 folder")
        hf = json.loads(cfg_path.read_text())
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"our blocks use tanh-approximated GELU (gelu_new); this model uses {activation!r}")
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           bias=True, tie_weights=hf.get("tie_word_embeddings", True))
        if (folder / "model.safetensors").exists():
            state = load_safetensors(str(folder / "model.safetensors"))
        elif (folder / "pytorch_model.bin").exists():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")

        model = cls(config)
        ours = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for key, tensor in state.items():
            name = key.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name not in ours:
                if name == "lm_head.weight" and config.tie_weights:
                    continue                                   # the same tensor as wte
                if name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue                                   # causal-mask buffers, not weights
                raise ValueError(f"unexpected key {key!r} in the GPT-2 checkpoint")
            if name.endswith(conv1d):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)}, ours {tuple(ours[name].shape)}")
            ours[name].copy_(tensor)
            loaded.add(name)
        missing = set(ours) - loaded - ({"lm_head.weight"} if config.tie_weights else set())
        if missing:
            raise ValueError(f"the checkpoint lacks {sorted(missing)[:5]}")
        return model
