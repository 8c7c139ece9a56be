"""What small Transformers learn that looks like an "emergent ability", measured.

Read top to bottom:

1. Tasks. :func:`repeated_spans` -- random tokens with one random span repeated later, at a
   random start and of a random length (the task on which induction heads form);
   :func:`parity_sequences` -- bit strings and their parity, answered directly or after a
   scratchpad of running parities; :func:`key_value_prompts` -- pairs ``key value`` drawn
   from a fresh random mapping per sequence, then a query key whose value must be recalled
   from the context (in-context learning).
2. :class:`AttentionOnlyConfig` and :class:`AttentionOnlyTransformer` -- token and position
   embeddings, ``n_layer`` attention layers (lessons_lib.attention's
   :class:`~lessons_lib.attention.MultiHeadAttention`, no MLPs) and an unembedding; it hands
   back every layer's attention weights when asked.
3. Reading attention: :func:`attention_to` (the weight each query puts on one chosen key),
   :func:`previous_token_score` and :func:`induction_score` (per head, from the weights).
4. :func:`ablate_heads` -- a context manager that zeroes chosen heads' outputs (a forward
   pre-hook on each attention's output projection), in any model built on MultiHeadAttention.
5. Scoring: :func:`token_and_exact_match` -- per-token accuracy and exact match of the same
   predictions (the "is emergence a mirage?" comparison), and :func:`repeat_loss`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention
from .checks import eval_mode, is_int, positive_int, token_ids
from .model import LearnedPositions, next_token_loss
from .runtime import model_device

__all__ = [
    "RepeatedSpans", "repeated_spans", "PARITY_EQUALS", "PARITY_PAD", "parity_sequences",
    "KeyValuePrompts", "key_value_prompts",
    "AttentionOnlyConfig", "AttentionOnlyTransformer",
    "attention_to", "previous_token_score", "induction_score", "ablate_heads",
    "token_and_exact_match", "repeat_loss",
]


def _generator(generator) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _randint(low: int, high: int, size, generator) -> torch.Tensor:
    """Integers in low..high (both included)."""
    return torch.randint(low, high + 1, size, generator=generator)


# -----------------------------------------------------------------------------
# 1. tasks

@dataclass
class RepeatedSpans:
    """A batch of :func:`repeated_spans`.

    ``inputs`` and ``targets`` (batch, T): the sequence and the same shifted by one.
    ``repeat_mask`` (batch, T): True at the query positions whose next token can be copied
    from the first occurrence of the span (the second copy, all but its last position).
    ``induction_key`` (batch, T): at those positions, the key an induction head attends to
    (the token after the earlier occurrence of the current token); -1 elsewhere.
    ``first``, ``second``, ``length`` (batch,): where the two copies start, and their length.
    """
    inputs: torch.Tensor
    targets: torch.Tensor
    repeat_mask: torch.Tensor
    induction_key: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    length: torch.Tensor


def repeated_spans(batch_size: int, T: int, vocab_size: int, min_span: int, max_span: int,
                   generator: torch.Generator | None = None) -> RepeatedSpans:
    """Sequences of ``T`` random tokens in which a span of random length (``min_span`` to
    ``max_span``) is copied to a later random place. With a fixed layout a model can learn
    where the copy sits instead of what it copies (a positional shortcut); random places and
    lengths leave only one way: find the current token earlier and copy what followed it.

    The span starts at ``first``, its copy at ``second >= first + length``; T + 1 tokens are
    drawn so that ``inputs`` and ``targets`` both have length T.
    """
    for name, value in (("batch_size", batch_size), ("T", T), ("vocab_size", vocab_size),
                        ("min_span", min_span), ("max_span", max_span)):
        positive_int(name, value)
    if not 2 <= min_span <= max_span:
        raise ValueError(f"need 2 <= min_span <= max_span, got min_span={min_span}, max_span={max_span}")
    if 2 * max_span > T + 1:
        raise ValueError(f"two copies of a span of up to {max_span} tokens do not fit in "
                         f"T + 1 = {T + 1} tokens")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    g = _generator(generator)
    seq = torch.randint(vocab_size, (batch_size, T + 1), generator=g)
    length = _randint(min_span, max_span, (batch_size,), g)
    # first in 0 .. T + 1 - 2L, then second in first + L .. T + 1 - L (uniform given first)
    first = (torch.rand(batch_size, generator=g) * (T + 2 - 2 * length)).long()
    room = T + 2 - length - (first + length)
    second = first + length + (torch.rand(batch_size, generator=g) * room).long()
    pos = torch.arange(T + 1)
    in_second = (pos >= second[:, None]) & (pos < (second + length)[:, None])
    source = (pos - (second - first)[:, None]).clamp(min=0)
    seq = torch.where(in_second, seq.gather(1, source), seq)
    inputs, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    q = torch.arange(T)
    # query t predicts token t + 1: copyable when t and t + 1 both lie in the second copy
    repeat_mask = (q >= second[:, None]) & (q + 1 < (second + length)[:, None])
    key = q - (second - first)[:, None] + 1
    induction_key = torch.where(repeat_mask, key, torch.full_like(key, -1))
    return RepeatedSpans(inputs, targets, repeat_mask, induction_key, first, second, length)


PARITY_EQUALS = 2     # the "=" token; the bits are tokens 0 and 1
PARITY_PAD = 3        # padding after the answer; never a target


def parity_sequences(bits: torch.Tensor, lengths: torch.Tensor, scratchpad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode bit strings and their parity as ``(inputs, targets)`` for next-token training.

    ``bits`` (batch, n_max) 0/1, of which the first ``lengths[i]`` count. Direct:
    ``b1 .. bn = p``; only ``p`` is a target. Scratchpad: ``b1 s1 b2 s2 .. bn sn = p`` with
    ``s_i`` the parity of ``b1 .. b_i`` (the running parity; ``p = sn``); every ``s_i`` and
    ``p`` are targets, the given bits and "=" are not (-100). Sequences are padded on the right
    with :data:`PARITY_PAD`; inputs and targets have length ``max(len) - 1``.
    """
    token_ids(bits, "bits", ndim=2, shape="(batch, n_max)")
    if bits.numel() and not bool(((bits == 0) | (bits == 1)).all()):
        raise ValueError("bits must hold only 0 and 1")
    token_ids(lengths, "lengths", ndim=1, shape="1-D (batch,)")
    B, n_max = bits.shape
    if lengths.shape[0] != B:
        raise ValueError(f"lengths must have one entry per string ({B}), got {lengths.shape[0]}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > n_max):
        raise ValueError(f"lengths must lie in 1..{n_max}, got {lengths.tolist()}")
    bits = bits.long()
    valid = torch.arange(n_max) < lengths[:, None]
    bits = bits * valid
    running = bits.cumsum(1) % 2
    answer = running.gather(1, (lengths - 1)[:, None].long())[:, 0]
    width = (2 if scratchpad else 1) * n_max + 2
    seq = torch.full((B, width), PARITY_PAD)
    is_target = torch.zeros(B, width, dtype=torch.bool)
    if scratchpad:
        seq[:, 0:2 * n_max:2] = torch.where(valid, bits, PARITY_PAD)
        seq[:, 1:2 * n_max:2] = torch.where(valid, running, PARITY_PAD)
        is_target[:, 1:2 * n_max:2] = valid
        end = 2 * lengths
    else:
        seq[:, :n_max] = torch.where(valid, bits, PARITY_PAD)
        end = lengths
    rows = torch.arange(B)
    seq[rows, end] = PARITY_EQUALS
    seq[rows, end + 1] = answer
    is_target[rows, end + 1] = True
    used = int((end + 2).max()) if B else 2
    seq, is_target = seq[:, :used], is_target[:, :used]
    inputs = seq[:, :-1].contiguous()
    targets = torch.where(is_target[:, 1:], seq[:, 1:], torch.full_like(seq[:, 1:], -100))
    return inputs, targets.contiguous()


@dataclass
class KeyValuePrompts:
    """A batch of :func:`key_value_prompts`: ``inputs``/``targets`` (batch, 2k + 2),
    ``key_in_context`` (batch,) True where the query's key is among the k pairs, and
    ``predictable`` (batch, 2k + 2) True at the targets the context determines: a value whose
    key was shown earlier in the sequence, and the answer when its key is in context."""
    inputs: torch.Tensor
    targets: torch.Tensor
    key_in_context: torch.Tensor
    predictable: torch.Tensor


def key_value_prompts(batch_size: int, k: int, n_keys: int, n_values: int,
                      generator: torch.Generator | None = None,
                      query_in_context: bool | None = None) -> KeyValuePrompts:
    """In-context recall: every sequence draws its own random mapping f (keys -> values), shows
    ``k`` pairs ``key f(key)``, then ``Q q f(q)``. Keys are tokens ``0..n_keys-1``, values
    ``n_keys..n_keys+n_values-1``, ``Q`` is ``n_keys + n_values`` (vocabulary n_keys+n_values+1).
    Targets are every value token and the answer (-100 elsewhere): a value inside the context
    is predictable only when its key appeared before with it.

    ``query_in_context``: True draws the query from the shown keys, False from the others,
    None from all keys (uniformly).
    """
    for name, value in (("batch_size", batch_size), ("k", k), ("n_keys", n_keys),
                        ("n_values", n_values)):
        positive_int(name, value)
    if query_in_context is False and k >= n_keys:
        raise ValueError(f"every one of the {n_keys} keys may be shown when k = {k}: "
                         "no key is left out of the context")
    g = _generator(generator)
    mapping = torch.randint(n_values, (batch_size, n_keys), generator=g) + n_keys
    keys = torch.randint(n_keys, (batch_size, k), generator=g)
    values = mapping.gather(1, keys)
    shown = torch.zeros(batch_size, n_keys, dtype=torch.bool)
    shown.scatter_(1, keys, True)
    if query_in_context is None:
        query = torch.randint(n_keys, (batch_size,), generator=g)
    else:
        allowed = shown if query_in_context else ~shown
        query = torch.multinomial(allowed.float(), 1, generator=g)[:, 0]
    answer = mapping.gather(1, query[:, None])[:, 0]
    pairs = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * k)
    q_token = torch.full((batch_size, 1), n_keys + n_values)
    seq = torch.cat([pairs, q_token, query[:, None], answer[:, None]], dim=1)
    inputs, targets = seq[:, :-1].contiguous(), seq[:, 1:].clone()
    is_value = torch.zeros_like(targets, dtype=torch.bool)
    is_value[:, 0:2 * k:2] = True            # target at position 2i is the value of pair i
    is_value[:, -1] = True                   # the answer
    targets = torch.where(is_value, targets, torch.full_like(targets, -100))
    in_context = shown.gather(1, query[:, None])[:, 0]
    # pair i's value is determined when its key appeared in an earlier pair
    seen_before = (keys[:, :, None] == keys[:, None, :]).tril(diagonal=-1).any(dim=2)
    predictable = torch.zeros_like(is_value)
    predictable[:, 0:2 * k:2] = seen_before
    predictable[:, -1] = in_context
    return KeyValuePrompts(inputs, targets, in_context, predictable)


# -----------------------------------------------------------------------------
# 2. an attention-only Transformer

@dataclass
class AttentionOnlyConfig:
    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            positive_int(f"AttentionOnlyConfig.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"AttentionOnlyConfig.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}")


class AttentionOnlyTransformer(nn.Module):
    """Embeddings, then ``n_layer`` residual attention layers ``x = x + attn(ln(x))`` (no
    MLPs), a final LayerNorm and an unembedding: the model of Elhage et al. (2021) and Olsson
    et al. (2022), in which induction heads were first taken apart."""

    def __init__(self, config: AttentionOnlyConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = LearnedPositions(config.block_size, config.n_embd)
        self.ln = nn.ModuleList(nn.LayerNorm(config.n_embd) for _ in range(config.n_layer))
        self.attn = nn.ModuleList(MultiHeadAttention(config.n_embd, config.n_head, causal=True)
                                  for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_weights: bool = False):
        """``idx`` (batch, T) -> ``(logits, loss)``; with ``return_weights=True``
        ``(logits, loss, weights)``, ``weights`` a list of (batch, n_head, T, T), one per layer."""
        token_ids(idx, "idx", vocab_size=self.config.vocab_size)
        x = self.wte(idx.long()) + self.wpe(idx)
        weights = []
        for ln, attn in zip(self.ln, self.attn):
            if return_weights:
                a, w = attn(ln(x), return_weights=True)
                weights.append(w)
            else:
                a = attn(ln(x))
            x = x + a
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else next_token_loss(logits, targets)
        return (logits, loss, weights) if return_weights else (logits, loss)


# -----------------------------------------------------------------------------
# 3. reading attention weights

def _check_weights(weights) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or weights.dim() < 2 \
            or weights.shape[-1] != weights.shape[-2] or not weights.is_floating_point():
        raise ValueError("weights must be a float tensor of attention weights (..., T, T), got "
                         f"{getattr(weights, 'shape', type(weights).__name__)}")
    return weights


def attention_to(weights: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mean weight that queries put on one chosen key each.

    ``weights`` (batch, n_head, T, T) (or (batch, T, T), one head); ``key`` (batch, T) the key
    position chosen for each query, -1 for queries that do not count. Returns (n_head,) (or a
    0-d tensor): for each head the mean of ``weights[b, h, t, key[b, t]]`` over the counted
    (b, t).
    """
    _check_weights(weights)
    one_head = weights.dim() == 3
    if one_head:
        weights = weights[:, None]
    if weights.dim() != 4:
        raise ValueError(f"weights must be (batch, n_head, T, T) or (batch, T, T), got {tuple(weights.shape)}")
    B, H, T, _ = weights.shape
    token_ids(key, "key", ndim=2, shape="(batch, T)")
    if tuple(key.shape) != (B, T):
        raise ValueError(f"key must have shape (batch, T) = {(B, T)}, got {tuple(key.shape)}")
    key = key.to(weights.device)
    counted = key >= 0
    if not bool(counted.any()):
        raise ValueError("key marks no query to count (all entries are -1)")
    if int(key.max()) >= T:
        raise ValueError(f"key positions must be below T = {T}, got {int(key.max())}")
    picked = weights.gather(3, key.clamp(min=0).long()[:, None, :, None].expand(B, H, T, 1))[..., 0]
    score = (picked * counted[:, None]).sum(dim=(0, 2)) / counted.sum()
    return score[0] if one_head else score


def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Per head, the mean attention from each position t >= 1 to position t - 1."""
    _check_weights(weights)
    T = weights.shape[-1]
    if T < 2:
        raise ValueError("a previous-token score needs at least 2 positions")
    B = weights.shape[0] if weights.dim() >= 3 else 1
    key = (torch.arange(T) - 1).expand(B, T)
    if weights.dim() == 2:
        return attention_to(weights[None], key)
    return attention_to(weights, key)


def induction_score(weights: torch.Tensor, induction_key: torch.Tensor) -> torch.Tensor:
    """Per head, the mean attention from each repeated token to the token that followed its
    earlier occurrence (``induction_key``, e.g. :attr:`RepeatedSpans.induction_key`)."""
    return attention_to(weights, induction_key)


# -----------------------------------------------------------------------------
# 4. ablating heads

@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: dict[int, list[int]]):
    """``with ablate_heads(model, {layer: [head, ...]}): ...`` zeroes those heads' outputs.

    ``layer`` counts the model's :class:`MultiHeadAttention` modules in order. A forward
    pre-hook on each one's output projection ``c_proj`` zeroes the input features of the
    chosen heads (head h owns features ``h * head_dim .. (h + 1) * head_dim - 1``), so the
    rest of the model runs unchanged. The hooks are removed on exit, also on an error.
    """
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not isinstance(heads, dict):
        raise ValueError(f"heads must be a dict {{layer: [head, ...]}}, got {type(heads).__name__}")
    handles = []
    try:
        for layer, chosen in heads.items():
            if not is_int(layer) or not 0 <= layer < len(attentions):
                raise ValueError(f"layer must be in 0..{len(attentions) - 1}, got {layer!r}")
            attn = attentions[layer]
            chosen = list(chosen)
            if not all(is_int(h) and 0 <= h < attn.n_heads for h in chosen):
                raise ValueError(f"heads of layer {layer} must be in 0..{attn.n_heads - 1}, got {chosen}")
            keep = torch.ones(attn.d_model)
            for h in chosen:
                keep[h * attn.head_dim:(h + 1) * attn.head_dim] = 0.0

            def hook(module, args, keep=keep):
                return (args[0] * keep.to(args[0].device, args[0].dtype),) + tuple(args[1:])
            handles.append(attn.c_proj.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# -----------------------------------------------------------------------------
# 5. scoring

def token_and_exact_match(logits: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy predictions scored two ways: per token (the share of target tokens whose argmax
    is right) and by exact match (the share of sequences with every target token right).

    ``logits`` (batch, T, vocab), ``targets`` (batch, T) with -100 for positions not scored.
    Every sequence needs at least one target. Returns two 0-d float tensors. With a per-token
    accuracy p spread evenly, exact match over L tokens is about p ** L: the "mirage" of
    Schaeffer et al. (2023).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be (batch, T, vocab), got {getattr(logits, 'shape', type(logits).__name__)}")
    token_ids(targets, "targets")
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])}, got {tuple(targets.shape)}")
    scored = targets != -100
    if not bool(scored.any(dim=1).all()):
        raise ValueError("every sequence needs at least one target (not -100)")
    right = (logits.argmax(-1) == targets) & scored
    per_token = right.sum().float() / scored.sum()
    exact = (right == scored).all(dim=1).float().mean()
    return per_token, exact


@torch.no_grad()
def repeat_loss(model: nn.Module, batch: RepeatedSpans) -> float:
    """The model's mean next-token loss over the copyable positions of ``batch`` (its
    ``repeat_mask``), in eval mode (restored after), on the model's device."""
    device = model_device(model)
    with eval_mode(model):
        logits = model(batch.inputs.to(device))[0]
    targets = torch.where(batch.repeat_mask, batch.targets, torch.full_like(batch.targets, -100))
    return next_token_loss(logits, targets.to(device)).item()
