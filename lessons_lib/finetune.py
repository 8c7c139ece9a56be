"""Supervised fine-tuning (SFT) and LoRA, read top to bottom.

1. :class:`ChatTemplate` -- how a (prompt, response) pair becomes one token sequence::

       <|prompt|> prompt tokens <|response|> response tokens <|end|>

   and :class:`Example`, its inputs and targets, with the targets of the prompt set to -100
   (ignored), so the loss is on the response and the end token only.
2. :func:`collate` (right padding, -100 targets at padding) and :func:`sft_loss` (the masked
   cross-entropy, per token or per example).
3. :func:`build_sft_dataset` (encode, and drop or truncate what does not fit ``block_size``)
   and :func:`sft_batch_fn`, which samples padded batches for :func:`lessons_lib.train.train`.
4. :func:`generate_responses` -- a model's answers (greedy or sampled) to many prompts, batched;
   :func:`continuation_logprobs` -- how likely each of a few fixed answers is after a prompt.
5. :func:`resize_token_embeddings` -- give a pre-trained GPT rows for the template's new tokens.
6. LoRA (Hu et al., 2021): :class:`LoRALinear` adds ``scale * B @ A`` to a frozen
   ``nn.Linear``; :func:`apply_lora` wraps a model's chosen layers and freezes everything else;
   :func:`merge_lora` / :func:`unmerge_lora`; :func:`lora_parameters`, :func:`parameter_counts`.
   The token table can be a target too (:class:`LoRAEmbedding`, read by a :class:`TiedHead`).

The special tokens take the ids just after the tokenizer's (``tokenizer.vocab_size`` and up):
the tokenizer never produces them, so a text can never fake a prompt or end marker, and a
model fine-tuned with the template needs ``template.vocab_size`` rows in its embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import non_negative_int, number_in, positive_int, positive_number, token_ids
from .generate import generate
from .model import next_token_loss, num_parameters
from .runtime import choose_device
from .scoring import encode_responses, response_logprobs

__all__ = ["IGNORE", "ChatTemplate", "Example", "collate", "sft_loss", "SFTDataset",
           "build_sft_dataset", "sft_batch_fn", "generate_responses", "continuation_logprobs",
           "resize_token_embeddings", "LoRALinear", "DEFAULT_LORA_TARGETS", "apply_lora",
           "lora_layers", "lora_parameters", "merge_lora", "unmerge_lora", "parameter_counts",
           "LoRAEmbedding", "TiedHead", "TOKEN_TABLE"]

IGNORE = -100       # a target the loss skips (PyTorch's ignore_index)


# -----------------------------------------------------------------------------
# 1. the template: (prompt, response) -> inputs and targets

class Example(NamedTuple):
    """One training sequence: ``inputs`` (T,) token ids and ``targets`` (T,), where
    ``targets[t]`` is the token after ``inputs[t]``, or -100 where the loss must not look."""

    inputs: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class ChatTemplate:
    """``<|prompt|> prompt <|response|> response <|end|>``, and ``<|pad|>`` for padding.

    ``base_vocab_size`` is the tokenizer's vocabulary size; the four special tokens get the ids
    ``base_vocab_size + 0, 1, 2, 3`` (prompt, response, end, pad), so ``vocab_size`` is
    ``base_vocab_size + 4``. Any tokenizer with ``encode(str) -> list[int]``,
    ``decode(list[int]) -> str`` and ``vocab_size`` works (e.g. ``CharTokenizer``,
    ``BPETokenizer``).
    """

    base_vocab_size: int

    def __post_init__(self):
        positive_int("ChatTemplate.base_vocab_size", self.base_vocab_size)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatTemplate":
        return cls(positive_int("tokenizer.vocab_size", getattr(tokenizer, "vocab_size", None)))

    @property
    def prompt_id(self) -> int:
        return self.base_vocab_size

    @property
    def response_id(self) -> int:
        return self.base_vocab_size + 1

    @property
    def end_id(self) -> int:
        return self.base_vocab_size + 2

    @property
    def pad_id(self) -> int:
        return self.base_vocab_size + 3

    @property
    def vocab_size(self) -> int:
        """The vocabulary a model needs for this template: the tokenizer's plus four."""
        return self.base_vocab_size + 4

    @property
    def special_tokens(self) -> dict[str, int]:
        return {"<|prompt|>": self.prompt_id, "<|response|>": self.response_id,
                "<|end|>": self.end_id, "<|pad|>": self.pad_id}

    def _text_ids(self, tokenizer, text, what: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"the {what} must be a str, got {type(text).__name__}")
        ids = list(tokenizer.encode(text))
        if not ids:
            raise ValueError(f"the {what} is empty: an example needs at least one {what} token")
        if max(ids) >= self.base_vocab_size or min(ids) < 0:
            raise ValueError(f"the tokenizer gave ids from {min(ids)} to {max(ids)}, but this "
                             f"template reserves {self.base_vocab_size} and up for its special "
                             "tokens: build it with ChatTemplate.for_tokenizer(tokenizer)")
        return ids

    def encode_prompt(self, tokenizer, prompt: str) -> list[int]:
        """``<|prompt|> prompt <|response|>``: what a model continues to answer ``prompt``."""
        return [self.prompt_id, *self._text_ids(tokenizer, prompt, "prompt"), self.response_id]

    def encode(self, tokenizer, prompt: str, response: str) -> Example:
        """The whole sequence, shifted by one into inputs and targets; the targets inside the
        prompt (up to and including ``<|response|>``, which we always write ourselves) are -100."""
        context = self.encode_prompt(tokenizer, prompt)
        answer = [*self._text_ids(tokenizer, response, "response"), self.end_id]
        sequence = torch.tensor(context + answer)
        targets = sequence[1:].clone()
        targets[:len(context) - 1] = IGNORE
        return Example(sequence[:-1], targets)

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids a response ends at: the template's four, then the tokenizer's own special
        tokens (``tokenizer.special_tokens``, e.g. the ``<|endoftext|>`` a model pre-trained on
        snippets separated by it learned to write; a tokenizer without them adds none)."""
        specials = getattr(tokenizer, "special_tokens", None) or {}
        own = sorted(int(i) for i in specials.values() if int(i) < self.base_vocab_size)
        return [*self.special_tokens.values(), *own]

    def response_text(self, tokenizer, ids) -> str:
        """The text of generated ``ids`` (what came after ``<|response|>``) up to the first
        stop id (normally ``<|end|>``; see :meth:`stop_ids`): plain text, which the tokenizer
        can encode again."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        stops = set(self.stop_ids(tokenizer))
        stop = next((i for i, t in enumerate(ids)
                     if t >= self.base_vocab_size or t in stops), len(ids))
        return tokenizer.decode(ids[:stop])

    def decode(self, tokenizer, ids) -> str:
        """Any ids as text, special tokens written by name (e.g. to print an example)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        names = {i: s for s, i in self.special_tokens.items()}
        pieces, run = [], []
        for t in ids:
            if t in names:
                pieces += [tokenizer.decode(run), names[t]]
                run = []
            else:
                run.append(t)
        return "".join(pieces) + tokenizer.decode(run)


# -----------------------------------------------------------------------------
# 2. batches and the loss

def _check_example(example, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(example, tuple) and len(example) == 2):
        raise ValueError(f"example {i} must be an Example (inputs, targets), "
                         f"got {type(example).__name__}")
    inputs, targets = example
    token_ids(inputs, f"example {i}'s inputs", ndim=1, shape="1-D")
    token_ids(targets, f"example {i}'s targets", ndim=1, shape="1-D")
    if len(inputs) == 0 or inputs.shape != targets.shape:
        raise ValueError(f"example {i} needs inputs and targets of one length >= 1, "
                         f"got {len(inputs)} and {len(targets)}")
    if not (targets != IGNORE).any():
        raise ValueError(f"example {i} has no target to learn (every target is {IGNORE})")
    return inputs, targets


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into ``inputs`` (B, T) and ``targets`` (B, T), T the longest example.

    Right padding: shorter rows end in ``pad_id`` with target -100. A causal model's position t
    sees only 0..t, so padding after a row's end changes nothing before it. ``pad_id`` must not
    occur in any example: then ``inputs == pad_id`` marks exactly the padding.
    """
    if isinstance(examples, Example) or not isinstance(examples, Sequence) or not examples:
        got = "[]" if isinstance(examples, Sequence) else type(examples).__name__
        raise ValueError(f"collate needs a non-empty list of examples, got {got}")
    non_negative_int("pad_id", pad_id)
    checked = [_check_example(ex, i) for i, ex in enumerate(examples)]
    clash = [i for i, (x, _) in enumerate(checked) if (x == pad_id).any()]
    if clash:
        raise ValueError(f"pad_id={pad_id} occurs in example {clash[0]}: padding must use an "
                         "id no example contains (the template's pad_id)")
    T = max(len(x) for x, _ in checked)
    inputs = torch.full((len(checked), T), pad_id, dtype=torch.long)
    targets = torch.full((len(checked), T), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(checked):
        inputs[row, :len(x)] = x
        targets[row, :len(y)] = y
    return inputs, targets


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, T, V) at the targets (B, T) that are not -100.

    ``reduction``: "mean" over every counted token of the batch (what training minimises, and
    what ``model(inputs, targets)`` returns), "sum", or "per_example", a (B,) tensor of each
    row's mean (so a row's loss does not depend on what else is in the batch).
    """
    if reduction not in ("mean", "sum", "per_example"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'per_example', got {reduction!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        got = getattr(logits, "shape", type(logits).__name__)
        raise ValueError(f"logits must be a (batch, T, vocab) tensor, got {got}")
    token_ids(targets, "targets", shape="(batch, T)")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:2])} (the logits' batch "
                         f"and T), got {tuple(targets.shape)}")
    counted = targets != IGNORE
    if not counted.any():
        raise ValueError(f"every target is {IGNORE}: there is nothing to compute a loss on")
    wrong = counted & ((targets < 0) | (targets >= logits.shape[-1]))
    if wrong.any():
        raise ValueError(f"targets must be {IGNORE} or lie in 0..{logits.shape[-1] - 1}, "
                         f"got {int(targets[wrong][0])}")
    if reduction == "mean":
        return next_token_loss(logits, targets)
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets.long(),
                                ignore_index=IGNORE, reduction="none")        # (B, T)
    if reduction == "sum":
        return per_token.sum()
    n = counted.sum(dim=1)
    if (n == 0).any():
        raise ValueError(f"row {int((n == 0).nonzero()[0])} has no target that is not {IGNORE}")
    return per_token.sum(dim=1) / n


# -----------------------------------------------------------------------------
# 3. the dataset and the sampler for lessons_lib.train

@dataclass
class SFTDataset:
    """Encoded examples, and how many pairs did not fit ``block_size`` (dropped or truncated)."""

    examples: list[Example]
    block_size: int
    dropped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _fit(example: Example, block_size: int, too_long: str, i: int) -> Example | None:
    """The example if it fits; else None (drop), cut to ``block_size`` (truncate) or an error."""
    if len(example.inputs) <= block_size:
        return example
    if too_long == "drop":
        return None
    if too_long == "error":
        raise ValueError(f"pair {i} needs {len(example.inputs)} positions, more than "
                         f"block_size={block_size}: shorten it, raise block_size, or pass "
                         "too_long='drop' or 'truncate'")
    response_start = int((example.targets != IGNORE).nonzero()[0])   # where <|response|> is
    if response_start >= block_size:
        raise ValueError(f"pair {i}'s prompt takes {response_start + 1} positions with its "
                         f"markers, more than block_size={block_size}: no room for a response")
    return Example(example.inputs[:block_size], example.targets[:block_size])


def build_sft_dataset(pairs, template: ChatTemplate, tokenizer, block_size: int,
                      too_long: str = "drop") -> SFTDataset:
    """Encode (prompt, response) ``pairs`` with ``template``; each example fits ``block_size``.

    An example has len(prompt) + len(response) + 2 positions (the markers and the end token,
    less the one shift). The rule for longer ones, ``too_long``:

    * "drop" (default): leave the example out (``dataset.dropped`` counts them);
    * "truncate": keep its first ``block_size`` positions: the whole prompt and the start of
      the response, without the end token (``dataset.truncated`` counts them); a prompt that
      leaves no room for one response token is a ValueError;
    * "error": a ValueError names the first example that does not fit.
    """
    positive_int("block_size", block_size)
    if too_long not in ("drop", "truncate", "error"):
        raise ValueError(f"too_long must be 'drop', 'truncate' or 'error', got {too_long!r}")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("build_sft_dataset needs at least one (prompt, response) pair, got none")
    dataset = SFTDataset([], block_size)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pair {i} must be (prompt, response), got {pair!r}")
        example = template.encode(tokenizer, *pair)
        fitted = _fit(example, block_size, too_long, i)
        if fitted is None:
            dataset.dropped += 1
        else:
            dataset.truncated += len(fitted.inputs) < len(example.inputs)
            dataset.examples.append(fitted)
    if not dataset.examples:
        raise ValueError(f"none of the {len(pairs)} pairs fits block_size={block_size}")
    return dataset


def sft_batch_fn(train_examples: Sequence[Example], val_examples: Sequence[Example],
                 batch_size: int, pad_id: int, device: str | torch.device = "auto"):
    """A ``batch_fn(split, generator) -> (inputs, targets)`` for :func:`lessons_lib.train.train`:
    ``batch_size`` examples of ``split`` ("train" or "val") drawn at random with replacement,
    padded by :func:`collate` and moved to ``device`` (give the same one as ``TrainConfig``;
    both default to "auto": CUDA when available, else the CPU)."""
    positive_int("batch_size", batch_size)
    device = choose_device(device)
    splits = {"train": list(train_examples), "val": list(val_examples)}
    for name, examples in splits.items():
        if not examples:
            raise ValueError(f"the {name} split has no examples")
        collate(examples, pad_id)        # check every example, and the pad id, once up front

    def batch_fn(split: str, generator: torch.Generator | None = None):
        if split not in splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        examples = splits[split]
        rows = torch.randint(len(examples), (batch_size,), generator=generator)
        inputs, targets = collate([examples[i] for i in rows.tolist()], pad_id)
        return inputs.to(device), targets.to(device)
    return batch_fn


# -----------------------------------------------------------------------------
# 4. answering prompts

def generate_responses(model: nn.Module, template: ChatTemplate, tokenizer, prompts: Sequence[str],
                       max_new_tokens: int | None, batch_size: int = 64, *, greedy: bool = True,
                       temperature: float = 1.0, generator: torch.Generator | None = None
                       ) -> list[str]:
    """The response of ``model`` to each prompt, cut at its first stop id
    (:meth:`ChatTemplate.stop_ids`): greedy by default, else sampled at ``temperature`` with
    ``generator``.

    Our GPT has no padding mask, so prompts are batched with others of the same token length:
    no padding, and each greedy answer is exactly what the model gives that prompt alone
    (a sampled one depends on the batching too, through the order of the random draws).
    ``max_new_tokens=None`` lets each answer fill the rest of the model's window.
    """
    if max_new_tokens is not None:
        positive_int("max_new_tokens", max_new_tokens)
    positive_int("batch_size", batch_size)
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
    encoded = [template.encode_prompt(tokenizer, p) for p in prompts]
    longest = max(len(e) for e in encoded)
    if longest + (max_new_tokens or 1) > model.config.block_size:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens or 1} new ones "
                         f"does not fit block_size={model.config.block_size}")
    stop_ids = template.stop_ids(tokenizer)
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(len(e), []).append(i)
    answers = [""] * len(prompts)
    for n, rows in by_length.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out = generate(model, torch.tensor([encoded[i] for i in chunk]),
                           max_new_tokens or model.config.block_size - n,
                           temperature=temperature, greedy=greedy, generator=generator,
                           stop_ids=stop_ids)
            for i, new in zip(chunk, out[:, n:].tolist()):
                answers[i] = template.response_text(tokenizer, new)
    return answers


def continuation_logprobs(model: nn.Module, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]],
                          batch_size: int = 128) -> torch.Tensor:
    """``(len(contexts), len(continuations))``: log P(continuation | context) under ``model``,
    the sum of the log-probabilities of the continuation's tokens, each given all before it.

    This is how a base model answers a multiple-choice question without generating: score
    every allowed answer after the prompt and pick the likeliest. Each context is followed by
    each continuation and scored by :func:`lessons_lib.scoring.response_logprobs`, in eval
    mode, ``batch_size`` contexts at a time, right-padded to the longest of them.
    """
    positive_int("batch_size", batch_size)
    lists = {}
    for what, seqs in (("contexts", contexts), ("continuations", continuations)):
        if isinstance(seqs, (str, torch.Tensor)) or not isinstance(seqs, Sequence) or not seqs:
            raise ValueError(f"{what} must be a non-empty list of token-id lists, got {seqs!r}")
        lists[what] = [list(s.tolist() if isinstance(s, torch.Tensor) else s) for s in seqs]
        empty = [i for i, s in enumerate(lists[what]) if not s]
        if empty:
            raise ValueError(f"{what}[{empty[0]}] is empty")
    contexts, continuations = lists["contexts"], lists["continuations"]
    longest = max(map(len, contexts)) + max(map(len, continuations))
    if longest > model.config.block_size:
        raise ValueError(f"a context and a continuation take up to {longest} tokens, more than "
                         f"block_size={model.config.block_size}")
    scores = torch.empty(len(contexts), len(continuations))
    for c, answer in enumerate(continuations):
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start:start + batch_size]
            idx, mask = encode_responses(chunk, [answer] * len(chunk), pad_id=0)
            scores[start:start + len(chunk), c] = response_logprobs(model, idx, mask, batch_size)
    return scores


# -----------------------------------------------------------------------------
# 5. room for the new tokens in a pre-trained GPT

@torch.no_grad()
def resize_token_embeddings(model: nn.Module, vocab_size: int,
                            generator: torch.Generator | None = None) -> nn.Module:
    """Grow a lessons_lib GPT's token embedding (and output head) to ``vocab_size`` rows.

    Old rows are kept. Each new row is drawn from a normal distribution with the mean and
    per-feature spread of the old rows: a typical token, not an outlier the pre-trained layers
    never saw, yet different from the other new rows (LoRA keeps embeddings frozen, so the new
    tokens must be told apart from the start). A tied head stays tied.
    """
    positive_int("vocab_size", vocab_size)
    wte, head = getattr(model, "wte", None), getattr(model, "lm_head", None)
    if not isinstance(wte, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError("expected a lessons_lib GPT with a wte embedding and an lm_head")
    old = wte.weight
    if vocab_size < old.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the model's {old.shape[0]}: "
                         "shrinking would delete tokens")
    tied = head.weight is wte.weight
    new = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    new.weight.requires_grad_(old.requires_grad)
    new.weight[:old.shape[0]] = old
    noise = torch.randn(vocab_size - old.shape[0], old.shape[1], generator=generator)
    new.weight[old.shape[0]:] = old.mean(0) + noise.to(old) * old.std(0)
    model.wte = new
    if tied:
        head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        head.weight = new.weight
    else:
        head = _grow_head(head, vocab_size)
    model.lm_head = head
    if hasattr(model, "config"):
        model.config = replace(model.config, vocab_size=vocab_size)
    return model


def _grow_head(head: nn.Linear, vocab_size: int) -> nn.Linear:
    """An untied head with extra rows: zeros (and a zero bias), so new tokens start at logit 0."""
    grown = nn.Linear(head.in_features, vocab_size, bias=head.bias is not None,
                      device=head.weight.device, dtype=head.weight.dtype)
    grown.weight.zero_()
    grown.weight[:head.out_features] = head.weight
    grown.weight.requires_grad_(head.weight.requires_grad)
    if head.bias is not None:
        grown.bias.zero_()
        grown.bias[:head.out_features] = head.bias
    return grown


# -----------------------------------------------------------------------------
# 6. LoRA: a trainable low-rank update beside a frozen Linear

def _start_unmerged(layer: nn.Module) -> None:
    """``merged`` as a Python bool (read on every forward, no device sync) and as a buffer
    ``lora_merged`` in the state_dict, so a checkpoint saved after :meth:`merge` loads as merged
    and the update is not applied a second time."""
    layer.merged = False
    layer.register_buffer("lora_merged", torch.zeros((), dtype=torch.bool,
                                                     device=layer.lora_A.device))


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` with ``base`` frozen, ``scale = alpha / r``.

    ``lora_A`` (r, in) starts like an ``nn.Linear`` weight (Kaiming-uniform, a = sqrt(5)) and
    ``lora_B`` (out, r) at zero, as in PEFT: at the start the layer computes exactly what the
    base did, and the update ``scale * B @ A`` has rank at most r. :meth:`merge` adds the update
    into the base weight (one matmul at inference), :meth:`unmerge` takes it back out.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        positive_int("r", r)
        positive_number("alpha", alpha)
        number_in("dropout", dropout, 0.0, 1.0, high_open=True)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scale = r, float(alpha), alpha / r
        self.dropout = nn.Dropout(dropout)
        _start_unmerged(self)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"

    def delta_weight(self) -> torch.Tensor:
        """The update ``scale * B @ A`` (out, in), the shape of the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:          # the update is inside base.weight already
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B @ A. While merged, A and B get no gradients: merge to serve."""
        if self.merged:
            raise ValueError("this LoRA layer is merged already")
        self.base.weight += self.delta_weight()
        self.merged = True
        self.lora_merged.fill_(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * B @ A: the base weight again, up to float rounding (~1e-7 of |W|)."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False
        self.lora_merged.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.merged = bool(self.lora_merged)     # a merged checkpoint loads merged


class LoRAEmbedding(nn.Module):
    """A frozen token table plus a trainable low-rank update: ``weight = W + scale * B @ A``.

    ``lora_B`` (vocab, r) starts at zero, ``lora_A`` (r, n_embd) like an ``nn.Linear`` weight,
    so at the start the table is exactly the base one. Row ``i`` of the update is ``B[i] @ A``:
    each token moves within one shared r-dimensional subspace, which is enough to give every
    word, say, a learned "sentiment" coordinate (rank 1). In a GPT with tied weights the output
    head reads the same ``weight`` (:class:`TiedHead`), so the update acts on both ends and
    :meth:`merge` is exact for both.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        positive_int("r", r)
        positive_number("alpha", alpha)
        self.base = base
        base.weight.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.embedding_dim, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.num_embeddings, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scale = r, float(alpha), alpha / r
        _start_unmerged(self)

    extra_repr = LoRALinear.extra_repr
    delta_weight = LoRALinear.delta_weight

    @property
    def weight(self) -> torch.Tensor:
        """The table in use: the base rows plus the update (the base alone once merged)."""
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge
    _load_from_state_dict = LoRALinear._load_from_state_dict


class TiedHead(nn.Module):
    """The output head of a tied GPT whose table is a :class:`LoRAEmbedding`:
    ``logits = x @ model.wte.weight.T``. It holds no parameter of its own (it reaches the table
    through the model, not as a submodule), so nothing is counted or saved twice."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = [model]          # in a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._model[0].wte.weight)


LORA_TYPES = (LoRALinear, LoRAEmbedding)


# Every Linear inside GPT's blocks: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj. Not lm_head:
# in a GPT with tied weights lm_head.weight *is* wte.weight, so merging an update into it would
# change the input embeddings too (merged != unmerged). The token table itself can be a target:
# "wte" wraps it in a LoRAEmbedding, which the tied head then reads (see apply_lora).
DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
TOKEN_TABLE = "wte"


def _matches(name: str, targets: Sequence[str]) -> str | None:
    """The target ``name`` ends with, in whole dotted parts ("c_proj" fits "h.0.attn.c_proj")."""
    return next((t for t in targets if name == t or name.endswith("." + t)), None)


def _check_targets(targets) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or any(not isinstance(t, str) or not t for t in targets):
        raise ValueError(f"targets must be non-empty layer names such as 'c_attn', got {targets!r}")
    return targets


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """For every parameter, all the names it goes by (more than one when weights are tied)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _chosen_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    layer_targets = tuple(t for t in targets if t != TOKEN_TABLE)
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and _matches(name, layer_targets)]
    unmatched = [t for t in layer_targets if not any(_matches(name, (t,)) for name in chosen)]
    if unmatched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"targets {unmatched} match no nn.Linear of the model; its Linear layers "
                         f"are {linears[:8]}{' ...' if len(linears) > 8 else ''}")
    shared = _tied(model)
    for name in chosen:
        others = [n for n in shared[id(model.get_submodule(name).weight)] if n != name + ".weight"]
        if others:
            raise ValueError(f"{name}.weight is tied to {others}: merging LoRA into it would "
                             f"change those too; leave it out of targets (for the token table "
                             f"and a head tied to it, use the target {TOKEN_TABLE!r})")
    return chosen


def _check_token_table(model: nn.Module) -> None:
    wte, head = getattr(model, "wte", None), getattr(model, "lm_head", None)
    if not isinstance(wte, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError(f"the target {TOKEN_TABLE!r} needs a lessons_lib GPT with an "
                         "nn.Embedding wte and an nn.Linear lm_head")
    if head.weight is not wte.weight:
        raise ValueError(f"the target {TOKEN_TABLE!r} needs tied embeddings "
                         "(lm_head.weight is wte.weight)")


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = DEFAULT_LORA_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name ends with one of ``targets`` in a :class:`LoRALinear`
    and freeze every other parameter; returns ``model`` (changed in place).

    A target is matched by whole dotted parts: "c_proj" wraps both ``attn.c_proj`` and
    ``mlp.c_proj``; "attn.c_proj" only the first. The target "wte" wraps a tied GPT's token
    table in a :class:`LoRAEmbedding` and makes its head a :class:`TiedHead` that reads the
    same updated table (no dropout there). A target that matches nothing, or a layer whose
    weight is tied to another parameter (GPT's lm_head), is a ValueError.
    """
    if any(isinstance(m, LORA_TYPES) for m in model.modules()):
        raise ValueError("the model has LoRA layers already: apply_lora once per model")
    positive_int("r", r)
    positive_number("alpha", alpha)
    number_in("dropout", dropout, 0.0, 1.0, high_open=True)
    targets = _check_targets(targets)
    chosen = _chosen_linears(model, targets)
    if TOKEN_TABLE in targets:
        _check_token_table(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    if TOKEN_TABLE in targets:
        model.wte = LoRAEmbedding(model.wte, r, alpha)
        model.lm_head = TiedHead(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """The model's LoRA layers by name; a ValueError if it has none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LORA_TYPES)}
    if not layers:
        raise ValueError("the model has no LoRA layers: call apply_lora(model, ...) first")
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every A and B matrix, r * (in + out) numbers per wrapped layer: all that LoRA trains."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W += scale * B @ A); returns ``model``."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every update back out of its base weight (W -= scale * B @ A); returns ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """``{"trainable", "total", "fraction"}``: parameters that get gradients, all of them (LoRA's
    included, tied weights once) and the share that trains."""
    trainable = num_parameters(model, trainable_only=True)
    total = num_parameters(model)
    if total == 0:
        raise ValueError("the model has no parameters")
    return {"trainable": trainable, "total": total, "fraction": trainable / total}
