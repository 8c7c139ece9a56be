"""A Llama-style decoder: what changed in the Transformer between GPT-2 (2019) and Llama (2023).

Read top to bottom:

1. :class:`LlamaConfig` -- the sizes (SmolLM2-135M: 30 layers, width 576, 9 query heads, 3
   key/value heads, a 1536-wide feed-forward block, 49,152 tokens).
2. :class:`RMSNorm` -- LayerNorm without the mean and without the bias: ``x / rms(x) * g``.
3. :class:`SwiGLU` -- the feed-forward block with a gate: ``down(silu(gate(x)) * up(x))``.
4. :class:`LlamaBlock` -- pre-norm residual block: ``ln_1`` (an RMSNorm), attention, ``ln_2``,
   SwiGLU. Its attention is :class:`lessons_lib.attention.MultiHeadAttention` (the one of every
   chapter) with rotary positions (``positions="rope"``), no biases, and grouped-query
   attention (``n_kv_head`` key/value heads).
5. :class:`Llama` -- token embeddings ``wte`` (no position embeddings: RoPE is inside the
   attention), the blocks ``h``, a final RMSNorm ``ln_f`` and the head ``lm_head``, tied to the
   embeddings if the config says so (``tie_weights``).
   :meth:`Llama.from_gguf` loads a GGUF file (SmolLM2's), :meth:`Llama.from_hf_state_dict`
   a Hugging Face ``LlamaForCausalLM`` state dict.
6. :func:`generate_until` -- greedy decoding with (or without) the
   key/value cache, stopping at an end token; :func:`chat` -- one question through the chat
   template, one answer back.

The names are the GPT's (:mod:`lessons_lib.model`, nanoGPT's): the config's ``n_layer``,
``n_head``, ``n_embd``, ``block_size``, ``tie_weights``, the modules above. Like
:class:`lessons_lib.model.GPT` the model is a :class:`lessons_lib.model.DecoderLM` (the
initialisation, ``block_size``, ``num_parameters``, ``new_kv_cache``) with the same
``forward(idx, targets, kv_cache) -> (logits, loss)``, so
:func:`lessons_lib.generate.generate` runs it too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention
from .checks import positive_int, token_ids
from .generate import generate
from .model import DecoderLM, KVCache, next_token_loss

__all__ = ["LlamaConfig", "RMSNorm", "SwiGLU", "LlamaBlock", "Llama", "generate_until", "chat", "GenerationResult"]


# -----------------------------------------------------------------------------
# 1. sizes

@dataclass
class LlamaConfig:
    """The sizes of a Llama-style decoder, named as :class:`lessons_lib.model.GPTConfig` names
    them, plus ``n_kv_head``, ``n_ff``, ``rope_base`` and ``norm_eps``. The defaults are
    SmolLM2-135M."""

    vocab_size: int = 49152
    block_size: int = 8192       # the longest sequence (context length)
    n_layer: int = 30
    n_head: int = 9              # query heads
    n_kv_head: int = 3           # key/value heads: n_head / n_kv_head query heads share one
    n_embd: int = 576
    n_ff: int = 1536             # hidden width of the SwiGLU block
    rope_base: float = 100000.0  # RoPE's theta
    norm_eps: float = 1e-5       # RMSNorm's epsilon
    tie_weights: bool = True     # the output head reuses the token embedding matrix

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "n_ff"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim = n_embd // n_head = {self.n_embd // self.n_head} must be "
                             f"even (RoPE turns pairs of features)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if not self.rope_base > 0 or not self.norm_eps > 0:
            raise ValueError(f"rope_base and norm_eps must be positive, got {self.rope_base}, "
                             f"{self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_gguf(cls, config) -> "LlamaConfig":
        """From a :class:`lessons_lib.gguf_file.GGUFConfig`."""
        return cls(vocab_size=config.vocab_size, block_size=config.block_size,
                   n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                   n_embd=config.n_embd, n_ff=config.n_ff, rope_base=config.rope_base,
                   norm_eps=config.norm_eps, tie_weights=config.tie_weights)

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        """From a transformers ``LlamaConfig``. A checkpoint that rescales RoPE's frequencies
        (``rope_scaling``, as Llama 3.1 and 3.2 do) is refused: this model would load it and be
        wrong at every position."""
        scaling = getattr(config, "rope_scaling", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope_scaling of type {kind!r} is not supported (only plain RoPE "
                             f"with rope_theta); got rope_scaling={scaling}")
        return cls(vocab_size=config.vocab_size, block_size=config.max_position_embeddings,
                   n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                   n_kv_head=config.num_key_value_heads, n_embd=config.hidden_size,
                   n_ff=config.intermediate_size,
                   rope_base=float(getattr(config, "rope_theta", None)
                                   or config.rope_parameters["rope_theta"]),
                   norm_eps=config.rms_norm_eps, tie_weights=config.tie_word_embeddings)


# -----------------------------------------------------------------------------
# 2. and 3. the two new pieces of the block

class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * g``.

    LayerNorm subtracts the mean, divides by the standard deviation, and adds a bias; RMSNorm
    only rescales, which is one reduction fewer and (the paper found) as good."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        positive_int("d", d)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != self.weight.shape:
            raise ValueError(f"x must have shape (..., {self.weight.shape[0]}), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        # the mean of squares in float32 at least (as transformers does): in bfloat16 its
        # 8-bit mantissa would round every row's scale
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """The gated feed-forward block (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

    GPT-2's MLP is ``proj(gelu(fc(x)))`` with two matrices; here a third one, the gate, decides
    per hidden unit how much of ``up(x)`` goes through. No biases."""

    def __init__(self, n_embd: int, n_ff: int):
        super().__init__()
        self.gate = nn.Linear(n_embd, n_ff, bias=False)
        self.up = nn.Linear(n_embd, n_ff, bias=False)
        self.down = nn.Linear(n_ff, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# -----------------------------------------------------------------------------
# 4. the block

class LlamaBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``: GPT-2's pre-norm block
    (:class:`lessons_lib.model.Block`, its names too) with RMSNorms, RoPE, grouped-query
    attention and a SwiGLU ``mlp``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, bias=False, causal=True,
                                       positions="rope", rope_base=config.rope_base,
                                       n_kv_heads=config.n_kv_head)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.n_ff)

    def forward(self, x: torch.Tensor, kv: tuple | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv=kv)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# 5. the model

class Llama(DecoderLM):
    """A Llama-architecture language model (Llama 2/3, SmolLM2, Mistral without sliding window).

    Its initialisation, ``block_size``, ``num_parameters`` and ``new_kv_cache`` are the GPT's
    (:class:`lessons_lib.model.DecoderLM`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)      # N(0, 0.02) for every matrix; RMSNorm gains stay 1

    def hidden_states(self, idx: torch.Tensor,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """``idx`` (batch, T) token ids -> the final RMSNorm's output (batch, T, n_embd): what
        the head reads (and a value or reward head, chapter 10), as :meth:`GPT.hidden_states`."""
        token_ids(idx, "idx")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        cached = kv_cache is not None
        start = kv_cache.pos if cached else 0
        if T == 0 or start + T > self.config.block_size:
            raise ValueError(f"sequence of length {T} at position {start} does not fit the "
                             f"model's block_size={self.config.block_size}")
        if cached:
            kv_cache.start(B, T)          # the batch and the room the cache holds
        token_ids(idx, "idx", vocab_size=self.config.vocab_size)
        x = self.wte(idx.long())
        for i, block in enumerate(self.h):
            x = block(x, kv=kv_cache.layer(i) if cached else None)
        if cached:
            kv_cache.advance(T)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None):
        """``idx`` (batch, T) token ids -> ``(logits (batch, T, vocab), loss)``; with
        ``kv_cache`` the tokens continue the cached sequence at ``kv_cache.pos``."""
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        return logits, (None if targets is None else next_token_loss(logits, targets))

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_hf_state_dict(cls, config: LlamaConfig, state_dict: dict) -> "Llama":
        """A model holding the weights of a Hugging Face ``LlamaForCausalLM`` state dict
        (names ``model.layers.N.self_attn.q_proj.weight``, ...; the rotate_half layout)."""
        model = cls(config)
        sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        missing = [k for k in _hf_names(config) if k not in sd]
        if missing:
            raise ValueError(f"the state dict lacks {len(missing)} weights, e.g. {missing[:3]}")

        def take(name, shape):
            t = sd.pop(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, the config says "
                                 f"{tuple(shape)}")
            return t

        with torch.no_grad():
            c = config
            model.wte.weight.copy_(take("model.embed_tokens.weight", (c.vocab_size, c.n_embd)))
            model.ln_f.weight.copy_(take("model.norm.weight", (c.n_embd,)))
            if not c.tie_weights:
                model.lm_head.weight.copy_(take("lm_head.weight", (c.vocab_size, c.n_embd)))
            sd.pop("lm_head.weight", None)     # a tied checkpoint may list it too
            kv = c.n_kv_head * c.head_dim
            for i, block in enumerate(model.h):
                p = f"model.layers.{i}."
                q = take(p + "self_attn.q_proj.weight", (c.n_embd, c.n_embd))
                k = take(p + "self_attn.k_proj.weight", (kv, c.n_embd))
                v = take(p + "self_attn.v_proj.weight", (kv, c.n_embd))
                block.attn.c_attn.weight.copy_(torch.cat((q, k, v)))     # q | k | v rows
                block.attn.c_proj.weight.copy_(take(p + "self_attn.o_proj.weight",
                                                    (c.n_embd, c.n_embd)))
                block.ln_1.weight.copy_(take(p + "input_layernorm.weight", (c.n_embd,)))
                block.ln_2.weight.copy_(take(p + "post_attention_layernorm.weight",
                                             (c.n_embd,)))
                block.mlp.gate.weight.copy_(take(p + "mlp.gate_proj.weight", (c.n_ff, c.n_embd)))
                block.mlp.up.weight.copy_(take(p + "mlp.up_proj.weight", (c.n_ff, c.n_embd)))
                block.mlp.down.weight.copy_(take(p + "mlp.down_proj.weight", (c.n_embd, c.n_ff)))
        if sd:
            raise ValueError(f"the state dict has {len(sd)} weights the model does not use, "
                             f"e.g. {sorted(sd)[:3]}")
        return model.eval()

    @classmethod
    def from_gguf(cls, path_or_file) -> "Llama":
        """Load a Llama-architecture GGUF file (a path or an open
        :class:`lessons_lib.gguf_file.GGUFFile`), weights dequantized to float32."""
        from .gguf_file import GGUFFile, hf_name

        gguf = path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)
        config = LlamaConfig.from_gguf(gguf.config)
        state = {hf_name(name): t for name, t in gguf.tensors(hf_layout=True).items()}
        return cls.from_hf_state_dict(config, state)


def _hf_names(config: LlamaConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_weights:
        names.append("lm_head.weight")
    for i in range(config.n_layer):
        names += [f"model.layers.{i}.{n}.weight" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj")]
    return names


# -----------------------------------------------------------------------------
# 6. generation

@dataclass
class GenerationResult:
    ids: list              # the new token ids (the stop token not included)
    seconds: float         # wall time of the whole generation (prompt included)
    prompt_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else float("inf")


@torch.inference_mode()
def generate_until(model: Llama, prompt_ids, max_new_tokens: int, stop_ids=(),
                   use_cache: bool = True) -> GenerationResult:
    """Greedy decoding of one sequence: append the most likely next token until one of
    ``stop_ids`` comes (not kept) or ``max_new_tokens`` are written.

    With ``use_cache`` the prompt runs once and each new token is one position through the
    model (its keys and values appended to a :class:`KVCache`); without, every step runs
    the whole sequence again."""
    if not isinstance(model, Llama):
        raise ValueError(f"model must be a Llama, got {type(model).__name__}")
    positive_int("max_new_tokens", max_new_tokens)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty")
    stop = [int(s) for s in stop_ids]
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens, greedy=True, use_cache=use_cache, stop_ids=stop)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] in stop:
        new = new[:-1]
    return GenerationResult(ids=new, seconds=seconds, prompt_tokens=ids.shape[1])


def chat(model: Llama, gguf, question: str, max_new_tokens: int = 48,
         system: str | None = None, use_cache: bool = True,
         tokenizer=None) -> tuple[str, GenerationResult]:
    """Ask ``question`` through the file's chat template; returns ``(answer, result)``.

    ``gguf``: the :class:`lessons_lib.gguf_file.GGUFFile` the model came from (its tokenizer
    and template); ``tokenizer``: its ``gguf.tokenizer()`` if you have it already (building one
    parses 49k merges, a few seconds). Generation stops at ``<|im_end|>`` (the end of the assistant's turn) or the
    end-of-text token."""
    if not isinstance(question, str) or not question:
        raise ValueError("question must be a non-empty string")
    messages = ([{"role": "system", "content": system}] if system else []) \
        + [{"role": "user", "content": question}]
    tok = gguf.tokenizer() if tokenizer is None else tokenizer
    prompt = gguf.render_chat(messages)
    ids = tok.encode(prompt, allowed_special="all")
    special = gguf.special_tokens()
    stop = [special[s] for s in ("<|im_end|>", "<|endoftext|>") if s in special]
    result = generate_until(model, ids, max_new_tokens, stop_ids=stop, use_cache=use_cache)
    return tok.decode(result.ids), result
