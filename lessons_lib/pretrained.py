"""Pre-trained models the chapters share, built here by a fixed recipe and cached.

Chapter 7 trains a small character-level GPT on the Shakespeare corpus; chapters 9-11 start
from a GPT pre-trained on the rated movie-review snippets (byte-level BPE, 1,024 tokens).
Later chapters load them instead of training them again:

    from lessons_lib.pretrained import movie_gpt, shakespeare_char
    model, tokenizer, report = shakespeare_char()      # trains on first call (about a minute)
    print(report.val_loss, report.train_seconds)
    model, tokenizer, report = movie_gpt()             # the base model of chapters 9-11
    assistant, template, history = movie_assistant()   # chapter 9's instruction SFT model
    reward_model, history = movie_reward_model()       # chapter 10's, reused by chapter 11

The first call trains with the chapter's recipe and saves the weights as a safetensors file in
the cache folder (``lessons_lib.assets.cache_dir()``, i.e. ``LESSONS_LIB_CACHE`` or
``~/.cache/lessons_lib``), under a name that includes a hash of the recipe: change any number in
the recipe and the next call trains a new model. Training is seeded, so the same recipe on the
same machine gives the same weights.

The score is :func:`evaluate_split`: the mean next-token loss over the *whole* validation split,
cut into non-overlapping windows of ``block_size`` tokens (the last window may be shorter), so
that every validation token is predicted exactly once and no number depends on random batches.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from . import assets
from .checks import eval_mode, positive_int, token_ids
from .data import (load_movie_ratings, load_shakespeare, snippet_prompts, split_ratings,
                   train_val_split)
from .model import GPT, GPTConfig, num_parameters
from .tokenizers import BPETokenizer, CharTokenizer
from .runtime import choose_device, choose_precision, model_device, runtime, threads_for
from .train import History, TrainConfig, load_checkpoint, save_checkpoint, train

__all__ = ["Recipe", "RECIPES", "CORPORA", "PretrainReport", "evaluate_split", "shakespeare_data",
           "movie_data", "train_pretrained", "train_shakespeare_char", "pretrained",
           "shakespeare_char", "movie_gpt", "ASSISTANT_KINDS", "ASSISTANT_TRAIN",
           "movie_instructions", "movie_assistant", "movie_reward_model", "movie_ppo_policy",
           "PPO_PROMPT_TOKENS", "cache_path", "models_dir", "END_OF_TEXT"]

# bump when the meaning of a recipe changes (data, model code) so old caches are not reused
FORMAT_VERSION = 3
END_OF_TEXT = "<|endoftext|>"        # separates the movie snippets; a special token of their BPE
# what CORPORA (below) builds, and the size of each corpus's tokenizer
CORPUS_VOCAB = {"shakespeare-char": 64, "movie-snippets-bpe1024": 1024}
CORPUS_NAMES = tuple(CORPUS_VOCAB)


# -----------------------------------------------------------------------------
# 1. the exact score: every validation token, once

@torch.no_grad()
def evaluate_split(model, ids: torch.Tensor, block_size: int | None = None, batch_size: int = 64,
                   device=None) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on the whole 1-D tensor ``ids``.

    The ``len(ids) - 1`` predictions (each token predicts the next one) are cut into
    consecutive, non-overlapping windows of ``block_size`` positions; each window is scored from
    a fresh context, so the first token of a window is predicted from itself alone and the last
    from ``block_size`` tokens. The last window is shorter when ``block_size`` does not divide
    ``len(ids) - 1``. The result is the sum of the per-token losses divided by ``len(ids) - 1``:
    every token counts once. Runs in float32 and in eval mode (no dropout).
    """
    token_ids(ids, "ids", ndim=1, shape="1-D")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens (one prediction), got {len(ids)}")
    model_block = getattr(getattr(model, "config", None), "block_size", None)
    block_size = block_size or model_block
    positive_int("block_size", block_size)
    if model_block is not None and block_size > model_block:
        raise ValueError(f"block_size={block_size} is longer than the model's block_size={model_block}")
    positive_int("batch_size", batch_size)

    device = device or model_device(model)
    inputs, targets = ids[:-1], ids[1:]
    n = len(inputs)
    full = n // block_size
    total = 0.0

    def window_loss(x, y) -> float:
        logits, _ = model(x.to(device))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1).long(),
                               reduction="sum").item()

    xs = inputs[: full * block_size].view(full, block_size)
    ys = targets[: full * block_size].view(full, block_size)
    with eval_mode(model):
        for i in range(0, full, batch_size):
            total += window_loss(xs[i:i + batch_size], ys[i:i + batch_size])
        if full * block_size < n:                              # the shorter last window
            total += window_loss(inputs[full * block_size:][None], targets[full * block_size:][None])
    return total / n


# -----------------------------------------------------------------------------
# 2. the recipe

def _model(**sizes) -> GPTConfig:
    return GPTConfig(**{"vocab_size": CORPUS_VOCAB["shakespeare-char"], "block_size": 64,
                        "n_layer": 2, "n_head": 4, "n_embd": 128, **sizes})


def _train(**settings) -> TrainConfig:
    return TrainConfig(**{"max_steps": 1800, "batch_size": 8, "block_size": 64, "lr": 6e-3,
                          "min_lr_ratio": 0.1, "warmup_steps": 54, "weight_decay": 0.1,
                          "betas": (0.9, 0.99), "grad_clip": 1.0, "eval_interval": 450,
                          "eval_batches": 20, "precision": "auto", "seed": 1337, **settings})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights: the model (a :class:`GPTConfig`), the
    training run (a :class:`TrainConfig`) and the corpus.

    The default is chapter 7's: 2 layers, 4 heads, 128 wide, 64-character windows; batches of 8
    windows and a high learning rate (on a 2-core CPU a large batch costs nearly as much per
    token as a small one, so small batches buy many more updates); 3% warmup then a cosine to a
    tenth; a fixed number of steps, so the run is deterministic. A variant is a ``replace``:
    ``replace(recipe, train=replace(recipe.train, seed=1))``.

    ``model.vocab_size`` is the corpus's (:data:`CORPUS_VOCAB`), ``model.block_size`` the
    training windows'. ``train.precision`` "auto" lets :mod:`lessons_lib.runtime` choose:
    bfloat16 autocast where the hardware computes it natively, float32 elsewhere. The two give
    slightly different weights, so the precision that actually ran is part of the cache key
    (:meth:`resolved`). The training run's ``device`` and ``progress`` are not part of the
    recipe: :meth:`train_config` sets them.
    """

    model: GPTConfig = field(default_factory=_model)
    train: TrainConfig = field(default_factory=_train)
    corpus: str = "shakespeare-char"     # one of CORPORA: the text and its tokenizer

    def __post_init__(self):
        if self.corpus not in CORPUS_VOCAB:
            raise ValueError(f"unknown corpus {self.corpus!r}; the corpora are {list(CORPUS_NAMES)}")
        if not isinstance(self.model, GPTConfig) or not isinstance(self.train, TrainConfig):
            raise ValueError(f"Recipe needs a GPTConfig and a TrainConfig, got "
                             f"{type(self.model).__name__} and {type(self.train).__name__}")
        if self.model.vocab_size != CORPUS_VOCAB[self.corpus]:
            raise ValueError(f"model.vocab_size must be the {self.corpus!r} tokenizer's "
                             f"{CORPUS_VOCAB[self.corpus]}, got {self.model.vocab_size}")
        if self.model.block_size != self.train.block_size:
            raise ValueError(f"model.block_size ({self.model.block_size}) and train.block_size "
                             f"({self.train.block_size}) must be the same: the model is "
                             "trained on windows as long as its context")

    def resolved(self, device: str = "auto") -> "Recipe":
        """This recipe with ``train.precision`` "auto" replaced by the runtime's choice on
        ``device``."""
        if self.train.precision != "auto":
            return self
        precision = choose_precision(choose_device(device))[0]
        return replace(self, train=replace(self.train, precision=precision))

    def train_config(self, device: str = "auto", progress: bool = True) -> TrainConfig:
        """``train`` for a run on ``device``, with or without a progress bar."""
        return replace(self.train, device=device, progress=progress)

    @property
    def tokens(self) -> int:
        """Training tokens the recipe reads: steps x batch x block."""
        return self.train.max_steps * self.train.batch_size * self.train.block_size

    def to_dict(self) -> dict:
        """The fields that decide the weights, as JSON would hold them (not the run's
        ``device`` and ``progress``)."""
        train = {k: v for k, v in asdict(self.train).items() if k not in ("device", "progress")}
        return json.loads(json.dumps({"corpus": self.corpus, "model": asdict(self.model),
                                      "train": train}))

    def key(self, device: str = "auto") -> str:
        """A short hash of :meth:`to_dict` with the precision resolved (and of the cache
        format): the cache file's name."""
        text = json.dumps({"format": FORMAT_VERSION, **self.resolved(device).to_dict()},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    # chapter 7's run, the "one-minute model": 1,800 steps, 40-50 s of training in float32 on a
    # 2-core AVX2 CPU; exact validation loss about 1.80 (see benchmarks/vs_nanogpt.py)
    "1min": Recipe(),
    # a longer run: 4 layers, 9,000 steps at lr 3e-3 (about 3 minutes where bfloat16 is native,
    # about 6 in float32 on an AVX2 CPU); validation loss about 1.53
    "3min": Recipe(model=_model(n_layer=4),
                   train=_train(max_steps=9000, lr=3e-3, warmup_steps=270, eval_interval=1500)),
    # chapters 9-11's base model: 4 layers x 128 on the training snippets, 200 steps of 64 x 64
    # tokens (about a minute in float32 on 2 AVX2 cores, val about 4.7 nats per token)
    "movies": Recipe(model=_model(vocab_size=1024, n_layer=4),
                     train=_train(batch_size=64, max_steps=200, lr=3e-3, warmup_steps=6,
                                  eval_interval=100, eval_batches=10),
                     corpus="movie-snippets-bpe1024"),
}


# -----------------------------------------------------------------------------
# 3. training and the report

@dataclass
class PretrainReport:
    """What a pre-trained model is and how well it does."""

    recipe: dict                     # Recipe.to_dict(), precision resolved
    key: str                         # the recipe's hash (the cache file's name)
    val_loss: float                  # evaluate_split on the whole val split
    train_seconds: float             # wall time of training: the steps and the periodic evaluations
                                     # (history["seconds"] counts the steps alone); callbacks excluded
    steps: int
    tokens: int                      # training tokens read
    parameters: int
    history: dict = field(default_factory=dict)   # the training History as lists
    device: str = "cpu"
    precision: str = "fp32"          # what training ran in: "fp32" or "bf16"
    precision_reason: str = ""       # why (lessons_lib.runtime.choose_precision)
    cpu: str = ""                    # the CPU's model name
    threads: int = 0                 # PyTorch threads during training (runtime.threads_for)
    torch_version: str = ""
    from_cache: bool = False
    path: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("from_cache")
        out.pop("path")
        return out


def shakespeare_data(val_fraction: float = 0.1):
    """``(tokenizer, train_ids, val_ids)``: the character-level Shakespeare corpus, last 10% for validation."""
    text = load_shakespeare()
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, val_fraction)
    return tokenizer, train_ids, val_ids


@lru_cache(maxsize=None)
def _movie_tokens(vocab_size: int):
    train, val = split_ratings(load_movie_ratings())
    tokenizer = BPETokenizer().train("\n".join(s.text for s in train), vocab_size - 1)
    tokenizer.add_special_tokens([END_OF_TEXT])
    eot = tokenizer.special_tokens[END_OF_TEXT]

    def stream(snippets):                    # snippet, end of text, snippet, end of text, ...
        return [i for s in snippets for i in tokenizer.encode_ordinary(s.text) + [eot]]
    return tokenizer.to_dict(), stream(train), stream(val)


def movie_data(vocab_size: int = 1024):
    """``(tokenizer, train_ids, val_ids)``: the rated movie snippets as one stream of BPE tokens
    per side of :func:`lessons_lib.data.split_ratings`' fixed split, each snippet followed by
    the end-of-text token. The byte-level BPE (``vocab_size`` ids, the last one
    ``<|endoftext|>``) is trained on the training snippets only."""
    positive_int("vocab_size", vocab_size)
    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed 257 (256 bytes and the end-of-text token), "
                         f"got {vocab_size}")
    tokenizer, train_ids, val_ids = _movie_tokens(vocab_size)
    return (BPETokenizer.from_dict(tokenizer), torch.tensor(train_ids, dtype=torch.long),
            torch.tensor(val_ids, dtype=torch.long))


# what each Recipe.corpus means: a function returning (tokenizer, train_ids, val_ids)
CORPORA = {
    "shakespeare-char": shakespeare_data,
    "movie-snippets-bpe1024": lambda: movie_data(1024),
}
assert tuple(CORPORA) == CORPUS_NAMES


def _as_recipe(recipe) -> Recipe:
    if recipe is None:
        return RECIPES["1min"]
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; the named recipes are {list(RECIPES)}")
        return RECIPES[recipe]
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a Recipe, one of {list(RECIPES)} or None, got {type(recipe).__name__}")
    return recipe


def models_dir() -> Path:
    """The folder of cached pre-trained models: ``pretrained/`` in the assets' cache folder."""
    return assets.cache_dir() / "pretrained"


def cache_path(recipe: Recipe | str | None = None, device: str = "auto") -> Path:
    """Where the model for ``recipe`` (trained on ``device``, in the precision chosen there) is
    or will be cached."""
    recipe = _as_recipe(recipe)
    return models_dir() / f"{recipe.corpus}-{recipe.key(device)}.safetensors"


def train_pretrained(recipe: Recipe | str | None = None, callback=None, progress: bool = True,
                     device: str = "auto"):
    """Train a fresh model with ``recipe`` on its corpus; return ``(model, tokenizer, report)``
    (nothing cached).

    ``callback(step, model, history)`` runs after each periodic evaluation, as in
    :func:`lessons_lib.train.train`. The model comes back in eval mode.
    """
    recipe = _as_recipe(recipe)
    precision = recipe.train.precision
    rt = runtime(device, None if precision == "auto" else precision)
    recipe = replace(recipe, train=replace(recipe.train, precision=rt.precision))
    tokenizer, train_ids, val_ids = CORPORA[recipe.corpus]()
    if tokenizer.vocab_size != recipe.model.vocab_size:
        raise ValueError(f"the {recipe.corpus!r} tokenizer has {tokenizer.vocab_size} tokens, "
                         f"the recipe's model {recipe.model.vocab_size}")
    torch.manual_seed(recipe.train.seed)
    model = GPT(recipe.model)
    in_callback = [0.0]

    def timed_callback(step, model, history):      # the caller's work is not training time
        t = time.perf_counter()
        callback(step, model, history)
        in_callback[0] += time.perf_counter() - t

    start = time.perf_counter()
    history = train(model, (train_ids, val_ids), recipe.train_config(rt.device, progress),
                    callback=timed_callback if callback is not None else None)
    seconds = time.perf_counter() - start - in_callback[0]
    model.eval()
    report = PretrainReport(recipe=recipe.to_dict(), key=recipe.key(rt.device),
                            val_loss=evaluate_split(model, val_ids, recipe.model.block_size),
                            train_seconds=seconds, steps=len(history.step), tokens=history.tokens,
                            parameters=model.num_parameters(), history=asdict(history),
                            device=rt.device, precision=history.precision, precision_reason=rt.reason,
                            cpu=rt.cpu, threads=history.threads, torch_version=torch.__version__)
    return model, tokenizer, report


def train_shakespeare_char(recipe: Recipe | str | None = None, callback=None, progress: bool = True,
                           device: str = "auto"):
    """:func:`train_pretrained` with chapter 7's recipe by default."""
    return train_pretrained(recipe, callback=callback, progress=progress, device=device)


def _tokenizer_to_json(tokenizer) -> dict:
    if isinstance(tokenizer, CharTokenizer):
        return {"chars": tokenizer.chars}
    return {"bpe": tokenizer.to_dict()}


def _tokenizer_from_json(meta: dict):
    return CharTokenizer(meta["chars"]) if "chars" in meta else BPETokenizer.from_dict(meta["bpe"])


def _save(model, tokenizer, report: PretrainReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_checkpoint(model, tmp, {"report": report.to_json(), "tokenizer": _tokenizer_to_json(tokenizer)})
    os.replace(tmp, path)                    # atomic: a reader never sees half a file


def _load(recipe: Recipe, path: Path, device: str):
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lessons_lib", "{}"))
    tokenizer = _tokenizer_from_json(meta["tokenizer"])
    model = GPT(recipe.model)
    load_checkpoint(model, path)
    info = meta["report"]
    if info.get("recipe") != recipe.to_dict():
        raise ValueError(f"{path} holds a model for another recipe")
    report = PretrainReport(**info, from_cache=True, path=str(path))
    return model.to(choose_device(device)).eval(), tokenizer, report


def pretrained(recipe: Recipe | str | None = None, *, retrain: bool = False, callback=None,
               progress: bool = True, device: str = "auto"):
    """The model ``recipe`` trains on its corpus: ``(model, tokenizer, report)``.

    The first call trains it with ``recipe`` (default: chapter 7's, ``RECIPES["1min"]``)
    and caches it; later calls load it from the cache without training (``report.from_cache``
    is then True and ``report.train_seconds`` is the original run's time). ``retrain=True``
    trains anyway and replaces the cached file, as chapter 7 does so that its curves are live.
    ``recipe`` may also be the name of one of :data:`RECIPES`. A model trained in bfloat16 and
    one trained in float32 are cached apart (see :meth:`Recipe.resolved`).
    """
    recipe = _as_recipe(recipe)
    path = cache_path(recipe, device)
    if path.exists() and not retrain:
        try:
            return _load(recipe.resolved(device), path, device)
        except (ValueError, KeyError, TypeError, OSError, SafetensorError):
            pass                             # a damaged or foreign file: train again
    model, tokenizer, report = train_pretrained(recipe, callback=callback, progress=progress,
                                                device=device)
    _save(model, tokenizer, report, path)
    report.path = str(path)
    return model, tokenizer, report


def shakespeare_char(recipe: Recipe | str | None = None, **kwargs):
    """Chapter 7's character-level Shakespeare GPT (``RECIPES["1min"]`` by default); the
    keyword arguments are :func:`pretrained`'s."""
    return pretrained(recipe, **kwargs)


def movie_gpt(recipe: Recipe | str = "movies", **kwargs):
    """Chapters 9-11's base model, a GPT pre-trained on the training snippets of the rated movie
    reviews (``RECIPES["movies"]``): it continues text and follows no instruction. The keyword
    arguments are :func:`pretrained`'s."""
    return pretrained(recipe, **kwargs)


def _cached_training(kind: str, key: dict, model, train_fn, history_type, retrain: bool):
    """``model`` trained by ``train_fn() -> history``, or loaded: the cache file named by
    ``kind`` and a hash of ``key`` holds the weights and the history. Returns the history
    (``from_cache`` True when loaded; the rest is the original run's). ``retrain`` trains even
    when the file exists, and replaces it."""
    text = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True)
    path = models_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"
    if path.exists() and not retrain:
        try:
            meta = load_checkpoint(model, path)      # checks every name and shape first
            return history_type(**{**meta["history"], "from_cache": True})
        except (ValueError, KeyError, TypeError, OSError, SafetensorError):
            pass                                     # a damaged or foreign file: train again
    history = train_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_checkpoint(model, tmp, {"history": asdict(history)})
    os.replace(tmp, path)                            # atomic: a reader never sees half a file
    return history


def _run_fields(config) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in ("progress", "threads")}


ASSISTANT_KINDS = ("short", "long", "positive", "negative")
ASSISTANT_TRAIN = TrainConfig(max_steps=400, batch_size=16, lr=3e-3, warmup_steps=20,
                              eval_interval=100, eval_batches=4, precision="auto", seed=0)


def movie_instructions(kinds=ASSISTANT_KINDS, *, seed: int = 0, recipe: Recipe | str = "movies",
                       device: str = "auto"):
    """Chapters 9-11's written instructions: an :class:`lessons_lib.instructions.InstructionMix`
    of ``kinds`` built with ``seed`` from the two sides of
    :func:`lessons_lib.data.split_ratings` (training snippets answer the training instructions;
    the held-out ones, which :func:`movie_gpt` never read, the held-out instructions), to fit
    the base model's window."""
    from .instructions import build_instruction_mix

    _, tokenizer, _ = movie_gpt(recipe, device=device)
    train_snippets, held_out_snippets = split_ratings(load_movie_ratings())
    return build_instruction_mix(train_snippets, held_out_snippets, tokenizer,
                                 _as_recipe(recipe).model.block_size, seed=seed, kinds=kinds)


def movie_assistant(config: TrainConfig | None = None, *, kinds=ASSISTANT_KINDS,
                    mix_seed: int = 0, recipe: Recipe | str = "movies", retrain: bool = False,
                    device: str = "auto"):
    """Chapter 9's assistant: ``(model, template, history)``.

    A copy of :func:`movie_gpt` with the rows of a :class:`lessons_lib.finetune.ChatTemplate`'s
    special tokens added (drawn with ``config.seed``), fine-tuned by
    :func:`lessons_lib.train.train` with ``config`` (None: :data:`ASSISTANT_TRAIN`) on every
    training pair of :func:`movie_instructions` ``(kinds, seed=mix_seed)``, the loss on the
    responses only. Cached as :func:`movie_reward_model` is: chapter 9 trains it live
    (``retrain=True``), chapters 10 and 11 load it.
    """
    from .finetune import ChatTemplate, build_sft_dataset, resize_token_embeddings, sft_batch_fn

    config = ASSISTANT_TRAIN if config is None else config
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        gpt, tokenizer, report = movie_gpt(recipe, device=device)
        template = ChatTemplate.for_tokenizer(tokenizer)
        model = resize_token_embeddings(copy.deepcopy(gpt), template.vocab_size,
                                        torch.Generator().manual_seed(config.seed))
        mix = movie_instructions(kinds, seed=mix_seed, recipe=recipe, device=device)
        block_size = gpt.config.block_size
        train_set = build_sft_dataset(mix.pairs("train"), template, tokenizer, block_size)
        val_set = build_sft_dataset(mix.pairs("held_out"), template, tokenizer, block_size)
        batch_fn = sft_batch_fn(train_set.examples, val_set.examples, config.batch_size,
                                template.pad_id)
        threads = config.threads or threads_for(num_parameters(model))
        key = {"base": report.key, "config": _run_fields(config), "threads": threads,
               "kinds": list(kinds), "mix_seed": mix_seed}
        history = _cached_training("movie-assistant", key, model,
                                   lambda: train(model, batch_fn, config), History, retrain)
    return model.eval(), template, history


def movie_reward_model(config=None, *, recipe: Recipe | str = "movies", retrain: bool = False,
                       device: str = "auto"):
    """Chapters 10 and 11's reward model: ``(reward_model, history)``.

    A :class:`lessons_lib.rlhf.RewardModel` on :func:`movie_gpt`'s trunk, its head drawn with
    ``config.seed``, trained by :func:`lessons_lib.rlhf.train_reward_model` on the human ratings
    of the training snippets with ``config`` (a ``RewardTrainConfig``; None: its defaults).
    Cached like the base model: a later call with the same config, base model, precision and
    thread count loads it (``history.from_cache`` is then True, and the rest of ``history`` is
    the original run's). ``retrain=True`` trains anyway and replaces the cached file, as
    chapter 10 does so that its training is live. The caller's random numbers are left as they
    were, so the result does not depend on what ran before.
    """
    from .rlhf import RewardModel, RewardTrainConfig, RewardTrainHistory, train_reward_model

    config = RewardTrainConfig() if config is None else config
    if not isinstance(config, RewardTrainConfig):
        raise ValueError(f"config must be a RewardTrainConfig or None, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        gpt, tokenizer, report = movie_gpt(recipe, device=device)
        threads = config.threads or threads_for(gpt.num_parameters())
        torch.manual_seed(config.seed)
        reward_model = RewardModel(gpt, eot_id=tokenizer.special_tokens[END_OF_TEXT])
        train_snippets, _ = split_ratings(load_movie_ratings())
        key = {"base": report.key, "config": _run_fields(config), "threads": threads}
        history = _cached_training(
            "movie-reward", key, reward_model,
            lambda: train_reward_model(reward_model, train_snippets, tokenizer, config),
            RewardTrainHistory, retrain)
    return reward_model.eval(), history


PPO_PROMPT_TOKENS = 2       # chapters 10 and 11 prompt with each training snippet's first tokens


def movie_ppo_policy(config=None, reward_config=None, *, recipe: Recipe | str = "movies",
                     retrain: bool = False, device: str = "auto"):
    """Chapters 10 and 11's PPO policy: ``(policy, history)``.

    A :class:`lessons_lib.rlhf.PolicyWithValue` on a copy of :func:`movie_gpt`, trained by
    :func:`lessons_lib.rlhf.train_ppo` with ``config`` (a ``PPOConfig``; None: its defaults)
    against :func:`movie_reward_model` ``(reward_config)``, with the base model as the
    reference, on the first :data:`PPO_PROMPT_TOKENS` tokens of every training snippet
    (:func:`lessons_lib.data.snippet_prompts`). Cached as :func:`movie_reward_model` is:
    chapter 10 trains it live (``retrain=True``), chapter 11 loads it.
    """
    from .rlhf import PolicyWithValue, PPOConfig, PPOHistory, train_ppo

    config = PPOConfig() if config is None else config
    if not isinstance(config, PPOConfig):
        raise ValueError(f"config must be a PPOConfig or None, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        gpt, tokenizer, report = movie_gpt(recipe, device=device)
        reward_model, _ = movie_reward_model(reward_config, recipe=recipe, device=device)
        policy = PolicyWithValue(copy.deepcopy(gpt))
        threads = config.threads or threads_for(num_parameters(policy))
        train_snippets, _ = split_ratings(load_movie_ratings())
        prompts = snippet_prompts(train_snippets, tokenizer, PPO_PROMPT_TOKENS)
        key = {"base": report.key, "config": _run_fields(config), "threads": threads,
               "reward": _run_fields(reward_config) if reward_config is not None else None,
               "prompt_tokens": PPO_PROMPT_TOKENS}
        history = _cached_training(
            "movie-ppo", key, policy,
            lambda: train_ppo(policy, gpt, reward_model, prompts, config), PPOHistory, retrain)
    return policy.eval(), history
