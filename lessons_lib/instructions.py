"""Written instructions a small model can learn and a program can check. Read top to bottom.

Each instruction asks for a movie review with a property a few lines of code can test, and its
training response is a real rated snippet that has the property:

* "short" / "long": "Write a short review." / "Write a long review." -- a snippet from the
  bottom / top third of the lengths in tokens; a response follows when it is at most
  ``max_tokens`` / at least ``min_tokens`` tokens long.
* "word": "Write a review that uses the word W." -- W a content word (four letters or more, not
  a stopword) of the snippet; the response follows when W appears in it as a whole word, in
  any case.
* "positive" / "negative": "Write a positive review." -- a snippet rated clearly positive (or
  negative) by people; the response follows when VADER, a rule-based sentiment analyzer
  (Hutto & Gilbert, 2014) that no model of this course trained, gives it a compound score
  above +0.05 (or below -0.05).
* "classify": "Is this review positive or negative? <review>" -- answered "positive" or
  "negative" after the people's rating, as in chapter 9.

1. :data:`KINDS`, :func:`instruction_prompt` -- the instructions' wording.
2. The checks' parts: :func:`content_words`, :func:`uses_word`, :func:`vader_compound`,
   :func:`pair_auc` (how often a long answer is longer than a short one, or an answer to
   "positive" more positive than one to "negative").
3. :class:`Instruction` -- one prompt, its reference response and what its check needs;
   :func:`follows` -- whether a response does what the prompt asked.
4. :func:`build_instruction_mix` -- train and held-out instructions from two disjoint sets of
   snippets, the same for the same seed; :class:`InstructionMix`.
5. :func:`follow_rates` -- the share of held-out prompts a model follows, per kind, by sampled
   answers (:class:`FollowRates`).

Every pair fits the model's window: ``len(prompt) + len(response) + 2 <= block_size`` tokens,
the rule of :func:`lessons_lib.finetune.build_sft_dataset`; pairs that do not fit are left out.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from typing import Sequence

import numpy as np
import torch

from .checks import non_negative_int, positive_int, positive_number
from .finetune import ChatTemplate, generate_responses

__all__ = ["KINDS", "PROMPTS", "STOPWORDS", "VADER_NEUTRAL", "instruction_prompt",
           "content_words", "uses_word", "vader_compound", "pair_auc", "Instruction",
           "follows", "InstructionMix", "build_instruction_mix", "FollowRates", "follow_rates"]


# -----------------------------------------------------------------------------
# 1. the instructions

PROMPTS = {
    "short": "Write a short review.",
    "long": "Write a long review.",
    "word": "Write a review that uses the word {word}.",
    "positive": "Write a positive review.",
    "negative": "Write a negative review.",
    "classify": "Is this review positive or negative? {review}",
}
KINDS = tuple(PROMPTS)
LABELS = ("positive", "negative")


def _check_kind(kind) -> str:
    if kind not in PROMPTS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def instruction_prompt(kind: str, word: str | None = None, review: str | None = None) -> str:
    """The prompt of ``kind``; "word" needs ``word`` and "classify" needs ``review``."""
    _check_kind(kind)
    needs = {"word": ("word", word), "classify": ("review", review)}.get(kind)
    if needs is not None and (not isinstance(needs[1], str) or not needs[1].strip()):
        raise ValueError(f"a {kind!r} prompt needs a non-empty {needs[0]}, got {needs[1]!r}")
    return PROMPTS[kind].format(word=word, review=review)


# -----------------------------------------------------------------------------
# 2. the parts of the checks

# Common English words of four letters or more that say nothing about a review (NLTK's list,
# its contractions cut at the apostrophe as _WORD cuts them, and a few more).
STOPWORDS = frozenset("""
    about above after again against aren been before being below between both cannot could
    couldn didn does doesn doing down during each even ever every from further hadn hasn have
    haven having here hers herself himself into itself just many might mightn more most much
    must mustn myself needn once only other ours ourselves over same shall shan should shouldn
    some such than that their theirs them themselves then there these they this those through
    under until very wasn were weren what when where which while whom will with without would
    wouldn your yours yourself yourselves also still
""".split())
MIN_WORD_LETTERS = 4
_WORD = re.compile(r"[^\W\d_]+")          # a run of letters (any alphabet)


def content_words(text: str) -> list[str]:
    """The distinct content words of ``text`` in order of first use, lower-cased: runs of
    letters at least four long that are not in :data:`STOPWORDS`."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    words = [w for w in _WORD.findall(text.lower())
             if len(w) >= MIN_WORD_LETTERS and w not in STOPWORDS]
    return list(dict.fromkeys(words))


def uses_word(text: str, word: str) -> bool:
    """Whether ``word`` appears in ``text`` as a whole word (no letter just before or after
    it), in any case: "Film" and "film's" use "film", "films" and "filmmaker" do not."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(word, str) or not _WORD.fullmatch(word):
        raise ValueError(f"word must be a run of letters, got {word!r}")
    return re.search(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", text, re.IGNORECASE) \
        is not None


VADER_NEUTRAL = 0.05     # VADER's own cut: compound above +0.05 positive, below -0.05 negative


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer   # reads its lexicon
    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, from -1 (most negative) to +1 (most positive):
    a sum of word ratings from a human-rated lexicon, adjusted by rules (negation, "but",
    capitals, exclamation marks), squashed into (-1, 1)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return float(_vader().polarity_scores(text)["compound"])


def _values(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {values!r}")
    return array


def pair_auc(lower: Sequence[float], higher: Sequence[float]) -> float:
    """The chance that a value of ``higher`` exceeds a value of ``lower``, over every pair, a
    tie counting one half: 0.5 when the two sets do not differ, 1.0 when every value of
    ``higher`` is above every value of ``lower``. It is the area under the ROC curve of the two
    sets told apart by the value (the Mann-Whitney U over the pairs), e.g. the lengths of the
    answers to "Write a short review." (lower) and "Write a long review." (higher)."""
    low, high = _values(lower, "lower"), _values(higher, "higher")
    above = (high[:, None] > low[None, :]).mean()
    ties = (high[:, None] == low[None, :]).mean()
    return float(above + 0.5 * ties)


# -----------------------------------------------------------------------------
# 3. one instruction, and its check

@dataclass(frozen=True)
class Instruction:
    """One prompt of a ``kind``, the reference ``response`` (the snippet, or the label for
    "classify"), the id of the snippet both came from, and what the check needs: ``max_tokens``
    ("short"), ``min_tokens`` ("long"), ``word`` ("word") or ``label`` ("classify")."""

    kind: str
    prompt: str
    response: str
    snippet_id: int
    word: str | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    label: str | None = None

    def __post_init__(self):
        _check_kind(self.kind)
        for name in ("prompt", "response"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"an Instruction's {name} must be a non-empty str, "
                                 f"got {value!r}")
        needs = {"short": ("max_tokens", positive_int), "long": ("min_tokens", positive_int),
                 "word": ("word", _letters), "classify": ("label", _label)}.get(self.kind)
        if needs is not None:
            needs[1](f"a {self.kind!r} Instruction's {needs[0]}", getattr(self, needs[0]))

    def pair(self) -> tuple[str, str]:
        """``(prompt, response)``, as :func:`lessons_lib.finetune.build_sft_dataset` takes."""
        return self.prompt, self.response


def _letters(name: str, value) -> str:
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise ValueError(f"{name} must be a run of letters, got {value!r}")
    return value


def _label(name: str, value) -> str:
    if value not in LABELS:
        raise ValueError(f"{name} must be one of {list(LABELS)}, got {value!r}")
    return value


def follows(example: Instruction, response: str, tokenizer=None) -> bool:
    """Whether ``response`` does what ``example.prompt`` asked (see the module's list). The
    length kinds count tokens with ``tokenizer``; the others do not need it. A response that is
    empty or only spaces follows no instruction."""
    if not isinstance(example, Instruction):
        raise ValueError(f"example must be an Instruction, got {type(example).__name__}")
    if not isinstance(response, str):
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    if not response.strip():
        return False
    kind = example.kind
    if kind in ("short", "long"):
        if tokenizer is None:
            raise ValueError(f"a {kind!r} check counts tokens: pass the tokenizer")
        n = len(tokenizer.encode(response))
        return n <= example.max_tokens if kind == "short" else n >= example.min_tokens
    if kind == "word":
        return uses_word(response, example.word)
    if kind == "positive":
        return vader_compound(response) > VADER_NEUTRAL
    if kind == "negative":
        return vader_compound(response) < -VADER_NEUTRAL
    return response.strip() == example.label


# -----------------------------------------------------------------------------
# 4. the mix: train and held-out instructions from disjoint snippets

@dataclass(frozen=True)
class InstructionMix:
    """Training and held-out instructions (each in a seeded random order) and the length
    thresholds in tokens: a "short" response has at most ``short_max``, a "long" one at least
    ``long_min`` (the thirds of the training snippets' lengths)."""

    train: tuple[Instruction, ...]
    held_out: tuple[Instruction, ...]
    short_max: int
    long_min: int

    def pairs(self, split: str = "train") -> list[tuple[str, str]]:
        """The (prompt, response) pairs of ``split`` ("train" or "held_out")."""
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        return [ex.pair() for ex in getattr(self, split)]

    def counts(self, split: str = "train") -> dict[str, int]:
        """How many instructions of each kind ``split`` holds."""
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        examples = getattr(self, split)
        return {kind: sum(ex.kind == kind for ex in examples) for kind in KINDS}


def _check_snippets(snippets, name: str) -> list:
    if isinstance(snippets, str) or not isinstance(snippets, Sequence) or not snippets:
        got = "[]" if isinstance(snippets, Sequence) else type(snippets).__name__
        raise ValueError(f"{name} must be a non-empty list of rated snippets, got {got}")
    for i, s in enumerate(snippets):
        text, score = getattr(s, "text", None), getattr(s, "score", None)
        if not (isinstance(text, str) and text.strip() and isinstance(getattr(s, "id", None), int)
                and isinstance(score, Real) and math.isfinite(score)):
            raise ValueError(f"{name}[{i}] must be a rated snippet with an int id, a non-empty "
                             f"text and a finite score (lessons_lib.data.RatedSnippet), "
                             f"got {s!r}")
    ids = [s.id for s in snippets]
    if len(set(ids)) < len(ids):
        raise ValueError(f"{name} must not repeat a snippet id; {len(ids) - len(set(ids))} "
                         "ids come twice")
    return list(snippets)


def _fits(tokenizer, prompt: str, response: str, block_size: int) -> bool:
    return len(tokenizer.encode(prompt)) + len(tokenizer.encode(response)) + 2 <= block_size


def _length_thresholds(snippets, n_tokens: dict[int, int], tokenizer,
                       block_size: int) -> tuple[int, int]:
    """The thirds of the lengths of the snippets that fit after a length instruction."""
    room = block_size - 2 - max(len(tokenizer.encode(PROMPTS[k])) for k in ("short", "long"))
    lengths = [n_tokens[s.id] for s in snippets if n_tokens[s.id] <= room]
    if len(lengths) < 3:
        raise ValueError(f"the length instructions need at least 3 training snippets of at "
                         f"most {room} tokens (block_size={block_size}), got {len(lengths)}")
    short_max = int(np.floor(np.quantile(lengths, 1 / 3)))
    long_min = int(np.ceil(np.quantile(lengths, 2 / 3)))
    if short_max >= long_min:
        raise ValueError(f"the training snippets' lengths do not spread: the bottom third ends "
                         f"at {short_max} tokens and the top third starts at {long_min}")
    return short_max, long_min


@dataclass(frozen=True)
class _Rules:
    short_max: int           # tokens
    long_min: int
    sentiment: float         # "positive" at least this rating, "negative" at most minus it
    classify: float          # "classify" at least this far from 0


def _instruction(kind: str, snippet, n_tokens: int, rules: _Rules, rng: random.Random,
                 held_out: bool) -> Instruction | None:
    """An instruction of ``kind`` that ``snippet`` answers, or None if it answers none."""
    text, score = snippet.text, snippet.score
    if kind == "classify":
        if abs(score) < rules.classify:
            return None
        label = LABELS[0] if score > 0 else LABELS[1]
        return Instruction(kind, instruction_prompt(kind, review=text), label, snippet.id,
                           label=label)
    if kind == "short" and n_tokens <= rules.short_max:
        fields = {"max_tokens": rules.short_max}
    elif kind == "long" and n_tokens >= rules.long_min:
        fields = {"min_tokens": rules.long_min}
    elif kind == "word" and content_words(text):
        words = content_words(text)
        fields = {"word": rng.choice(words if held_out else words[:2])}
    elif kind == "positive" and score >= rules.sentiment:
        fields = {}
    elif kind == "negative" and score <= -rules.sentiment:
        fields = {}
    else:
        return None
    return Instruction(kind, instruction_prompt(kind, word=fields.get("word")), text, snippet.id,
                       **fields)


def _instructions(kind: str, snippets, n_tokens: dict[int, int], tokenizer, block_size: int,
                  rules: _Rules, rng: random.Random, held_out: bool,
                  limit: int | None) -> list[Instruction]:
    """Up to ``limit`` instructions of ``kind`` that fit ``block_size``, in a shuffled order."""
    order = list(range(len(snippets)))
    rng.shuffle(order)
    made = []
    for i in order:
        example = _instruction(kind, snippets[i], n_tokens[snippets[i].id], rules, rng, held_out)
        if example is not None and _fits(tokenizer, *example.pair(), block_size):
            made.append(example)
            if len(made) == limit:
                break
    return made


def build_instruction_mix(train_snippets: Sequence, held_out_snippets: Sequence, tokenizer,
                          block_size: int = 64, *, seed: int = 0,
                          train_per_kind: int | None = None, held_out_per_kind: int = 100,
                          kinds: Sequence[str] = KINDS, sentiment_rating: float = 2.0,
                          classify_rating: float = 1.0) -> InstructionMix:
    """Instructions of each of ``kinds`` built from ``train_snippets`` (training) and from
    ``held_out_snippets`` (held out), e.g. the two sides of
    :func:`lessons_lib.data.split_ratings`; the two must share no snippet id. Its default split
    is the one :func:`lessons_lib.pretrained.movie_gpt` was pre-trained on: that model has
    never read the held-out snippets.

    For each kind the snippets are shuffled (seeded by ``seed``, the kind and the side), the
    ones that can answer the instruction and fit ``block_size`` with it are kept, at most
    ``train_per_kind`` (None: all) and ``held_out_per_kind`` of them. A training word is one of
    its snippet's first two content words, a held-out word any of them. "positive" / "negative"
    responses are snippets rated at least ``sentiment_rating`` / at most minus that; "classify"
    uses snippets rated at least ``classify_rating`` away from 0. The same arguments give the
    same mix.
    """
    train_snippets = _check_snippets(train_snippets, "train_snippets")
    held_out_snippets = _check_snippets(held_out_snippets, "held_out_snippets")
    shared = {s.id for s in train_snippets} & {s.id for s in held_out_snippets}
    if shared:
        raise ValueError(f"train_snippets and held_out_snippets must be disjoint, but "
                         f"{len(shared)} snippet ids are in both, e.g. {min(shared)}")
    positive_int("block_size", block_size)
    non_negative_int("seed", seed)
    if train_per_kind is not None:
        positive_int("train_per_kind", train_per_kind)
    positive_int("held_out_per_kind", held_out_per_kind)
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty list of kinds from {list(KINDS)}, "
                         f"got {kinds!r}")
    for kind in kinds:
        _check_kind(kind)
    positive_number("sentiment_rating", sentiment_rating)
    positive_number("classify_rating", classify_rating)
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise ValueError(f"tokenizer must have encode(str) and decode(ids), got "
                             f"{type(tokenizer).__name__}")

    n_tokens = {s.id: len(tokenizer.encode(s.text)) for s in train_snippets + held_out_snippets}
    short_max, long_min = _length_thresholds(train_snippets, n_tokens, tokenizer, block_size)
    rules = _Rules(short_max, long_min, sentiment_rating, classify_rating)
    splits = {}
    for side, snippets, limit in (("train", train_snippets, train_per_kind),
                                  ("held_out", held_out_snippets, held_out_per_kind)):
        examples = []
        for kind in dict.fromkeys(kinds):
            rng = random.Random(f"{seed}:{kind}:{side}")
            made = _instructions(kind, snippets, n_tokens, tokenizer, block_size, rules, rng,
                                 side == "held_out", limit)
            if not made:
                raise ValueError(f"no {side} snippet gives a {kind!r} instruction that fits "
                                 f"block_size={block_size}")
            examples += made
        random.Random(f"{seed}:order:{side}").shuffle(examples)
        splits[side] = tuple(examples)
    return InstructionMix(splits["train"], splits["held_out"], short_max, long_min)


# -----------------------------------------------------------------------------
# 5. how often a model follows the held-out instructions

@dataclass(frozen=True)
class FollowRates:
    """Per kind, the share of held-out prompts whose sampled response follows (``rates``), out
    of ``n`` prompts; :func:`pair_auc` of the lengths in tokens of the responses to "short" and
    "long" prompts, and of VADER's compound score of the responses to "negative" and
    "positive" prompts (None without both kinds). The responses are sampled: every prompt of a
    kind is one fixed instruction such as "Write a short review.", to which greedy decoding
    would give one answer, followed or not."""

    rates: dict[str, float]
    n: dict[str, int]
    length_auc: float | None
    sentiment_auc: float | None
    responses: tuple[str, ...]


def follow_rates(model, template: ChatTemplate, tokenizer, examples: Sequence[Instruction], *,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> FollowRates:
    """Answer every example's prompt with ``model`` (in ``template``), sampling at
    ``temperature`` (a generator seeded with ``seed``), and check each answer with
    :func:`follows`. An answer may fill the model's window; the responses are in the order of
    ``examples``."""
    if isinstance(examples, Instruction) or not isinstance(examples, Sequence) or not examples:
        raise ValueError(f"examples must be a non-empty list of Instructions, got {examples!r}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Instruction):
            raise ValueError(f"examples[{i}] must be an Instruction, got {type(ex).__name__}")
    positive_number("temperature", temperature)
    non_negative_int("seed", seed)
    block_size = model.config.block_size
    generator = torch.Generator().manual_seed(seed)
    by_kind: dict[str, list[int]] = {}
    by_length: dict[int, list[int]] = {}        # each prompt may take the rest of the window
    for i, ex in enumerate(examples):
        by_kind.setdefault(ex.kind, []).append(i)
        by_length.setdefault(len(template.encode_prompt(tokenizer, ex.prompt)), []).append(i)
    answers = [""] * len(examples)
    for n, rows in sorted(by_length.items()):
        if n >= block_size:
            raise ValueError(f"a prompt of {n} tokens with its markers leaves no room for an "
                             f"answer in block_size={block_size}: {examples[rows[0]].prompt!r}")
        got = generate_responses(model, template, tokenizer, [examples[i].prompt for i in rows],
                                 block_size - n, batch_size, greedy=False,
                                 temperature=temperature, generator=generator)
        for i, text in zip(rows, got):
            answers[i] = text
    by_kind = {kind: by_kind[kind] for kind in KINDS if kind in by_kind}
    rates = {kind: float(np.mean([follows(examples[i], answers[i], tokenizer) for i in rows]))
             for kind, rows in by_kind.items()}
    aucs = {}
    for name, low, high, measure in (
            ("length", "short", "long", lambda text: len(tokenizer.encode(text))),
            ("sentiment", "negative", "positive", vader_compound)):
        aucs[name] = None
        if low in by_kind and high in by_kind:
            aucs[name] = pair_auc(*([measure(answers[i]) for i in by_kind[kind]]
                                    for kind in (low, high)))
    return FollowRates(rates, {kind: len(rows) for kind, rows in by_kind.items()},
                       aucs["length"], aucs["sentiment"], tuple(answers))
