"""Where language models break, in miniature (chapter 13).

Read top to bottom:

1. A world of made-up facts: :func:`make_names` (pronounceable names no model has seen),
   :class:`FactsWorld` and :func:`make_facts_world` (who lives in which of 20 capitals),
   the sentences that state them (:func:`fact_text`,
   :func:`question_text`, :func:`note_text`) and
   :func:`facts_batch_fn`, the training batches (one sentence per row, padded).
2. Asking the model: :func:`choice_probs` (the probability of each candidate answer, from the
   log-likelihood of its characters) and :func:`greedy_answers` (the model's own answer).
3. Calibration: :func:`reliability_bins`, :func:`expected_calibration_error` and
   :func:`coverage_accuracy` (answer only above a confidence threshold).
4. Context windows: :func:`loss_by_position` (the mean loss at every position of long windows).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import eval_mode, positive_int, token_ids
from .generate import generate
from .runtime import model_device
from .scoring import token_logprobs

__all__ = ["CAPITALS", "make_names", "FactsWorld", "make_facts_world", "fact_text",
           "question_text", "note_text", "facts_batch_fn",
           "choice_probs", "greedy_answers", "reliability_bins", "expected_calibration_error",
           "coverage_accuracy", "loss_by_position"]

# 20 capitals, each with its own first letter: the first letter the model writes is its answer
CAPITALS = ("accra", "baku", "cairo", "doha", "hanoi", "juba", "kabul", "lima", "minsk",
            "niamey", "oslo", "paris", "quito", "rome", "seoul", "tokyo", "vienna", "warsaw",
            "yerevan", "zagreb")
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
PAD = "\n"              # starts every sentence and pads the rows of a batch


# -----------------------------------------------------------------------------
# 1. a world of made-up facts

def make_names(n: int, seed: int = 0, length: int = 6) -> list[str]:
    """``n`` distinct made-up names: consonant, vowel, consonant, ... (``length`` letters)."""
    positive_int("n", n)
    positive_int("length", length)
    possible = len(CONSONANTS) ** ((length + 1) // 2) * len(VOWELS) ** (length // 2)
    if n > possible // 2:
        raise ValueError(f"asked for {n} names of {length} letters; only {possible} exist "
                         "(ask for fewer, or longer names)")
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = "".join(rng.choice(VOWELS if i % 2 else CONSONANTS) for i in range(length))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass
class FactsWorld:
    """Who lives where: ``seen``, the names the model is trained on; ``unseen``, names it never
    meets; ``city``, every name's capital (seen and unseen), one of ``cities``."""

    seen: list[str]
    unseen: list[str]
    city: dict[str, str]
    cities: tuple[str, ...] = CAPITALS


def make_facts_world(n_seen: int = 300, n_unseen: int = 300,
                     cities: tuple[str, ...] = CAPITALS, seed: int = 0) -> FactsWorld:
    """A random :class:`FactsWorld`: every name gets a capital uniformly at random."""
    positive_int("n_seen", n_seen)
    positive_int("n_unseen", n_unseen)
    if len(cities) < 2 or len(set(cities)) != len(cities):
        raise ValueError(f"cities must be at least 2 distinct names, got {cities!r}")
    names = make_names(n_seen + n_unseen, seed=seed)
    rng = random.Random(seed + 1)
    city = {name: rng.choice(cities) for name in names}
    return FactsWorld(seen=names[:n_seen], unseen=names[n_seen:], city=city, cities=tuple(cities))


def fact_text(name: str, city: str) -> str:
    """The training sentence of one fact, kept short (every character costs training time):
    ``"kovira: lima."`` for "kovira lives in lima"."""
    return f"{name}: {city}."


def question_text(name: str) -> str:
    """The question is the sentence's start, ``"kovira: "``; the answer is ``city.``"""
    return f"{name}: "


def note_text(name: str, city: str) -> str:
    """A note put before a question, ``"kovira=oslo; "``: the context a retrieval system
    would add to the prompt."""
    return f"{name}={city}; "


def facts_batch_fn(world: FactsWorld, tokenizer, batch_size: int = 64, p_note: float = 0.25,
                   block_size: int = 64, device="cpu"):
    """``batch_fn(split, generator) -> (inputs, targets)`` for :func:`lessons_lib.train.train`.

    Each row is one sentence that starts with ``PAD`` ("\\n") and is padded with it; targets
    are -100 on the padding and on the sentence's first name (random letters: there is nothing
    to predict in them, and the model need not learn to write names). A batch is, with
    probability ``p_note``, a batch of notes -- a seen name with a random city, then the
    question answered with the note's city, so that the model learns to trust its context --
    and otherwise a batch of seen facts (one kind per batch: no row waits on a longer one).
    The "val" split draws the same mixture: the facts are the data, there is nothing to hold out.
    The batches go to ``device``.
    """
    positive_int("batch_size", batch_size)
    if not 0 <= p_note <= 1:
        raise ValueError(f"p_note must be a probability, got {p_note}")
    seen, cities = world.seen, world.cities
    name_length = len(seen[0])
    pad = tokenizer.encode(PAD)[0]

    def batch_fn(split, generator):
        notes = float(torch.rand((), generator=generator)) < p_note
        names = torch.randint(len(seen), (batch_size,), generator=generator).tolist()
        told = torch.randint(len(cities), (batch_size,), generator=generator).tolist()
        texts = [PAD + (note_text(seen[n], cities[c]) + fact_text(seen[n], cities[c]) if notes
                        else fact_text(seen[n], world.city[seen[n]]))
                 for n, c in zip(names, told)]
        longest = max(len(t) for t in texts)
        if longest > block_size + 1:
            raise ValueError(f"a sentence of {longest} characters does not fit block_size={block_size}")
        rows = torch.full((batch_size, longest + 1), -100, dtype=torch.long)
        for r, t in enumerate(texts):
            rows[r, :len(t)] = torch.tensor(tokenizer.encode(t))
        inputs = rows[:, :-1].clone()
        inputs[inputs < 0] = pad
        targets = rows[:, 1:].clone()
        targets[:, :name_length] = -100     # the first name is random: nothing to learn there
        return inputs.to(device), targets.to(device)

    return batch_fn


# -----------------------------------------------------------------------------
# 2. asking the model

@torch.no_grad()
def choice_probs(model, tokenizer, prompts: list[str], candidates: list[str],
                 batch_size: int = 256) -> torch.Tensor:
    """(len(prompts), len(candidates)): the probability the model gives each candidate answer.

    The candidates must start with distinct characters (the capitals do), so the first
    character the model writes after the prompt picks its answer: the log-probabilities of the
    candidates' first characters (:func:`lessons_lib.scoring.token_logprobs`), renormalised
    over the candidates by a softmax. The largest of these is what we call the model's
    confidence. Prompts of any lengths, right-padded, ``batch_size`` per forward pass."""
    if not prompts or not candidates:
        raise ValueError("choice_probs needs at least one prompt and one candidate")
    firsts = [c[:1] for c in candidates]
    if "" in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"the candidates must be non-empty and start with distinct characters, "
                         f"got {candidates!r}")
    first_ids = torch.tensor([tokenizer.encode(c)[0] for c in firsts])
    pad = tokenizer.encode(PAD)[0]
    device = model_device(model)
    out = torch.empty(len(prompts), len(candidates))
    with eval_mode(model):
        for lo in range(0, len(prompts), batch_size):
            chunk = [tokenizer.encode(p) for p in prompts[lo:lo + batch_size]]
            if min(len(c) for c in chunk) == 0:
                raise ValueError("every prompt needs at least one character")
            lengths = torch.tensor([len(c) for c in chunk])
            ids = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)
            for r, c in enumerate(chunk):                  # padded on the right: causal, so
                ids[r, :len(c)] = torch.tensor(c)          # the padding cannot change a prompt
            logits, _ = model(ids.to(device))
            last = logits[torch.arange(len(chunk)), (lengths - 1).to(device)].cpu()   # (B, V)
            firsts_logp = token_logprobs(last, first_ids.expand(len(chunk), -1))     # (B, K)
            out[lo:lo + len(chunk)] = firsts_logp.softmax(-1)
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], n_chars: int) -> list[str]:
    """The ``n_chars`` characters the model writes after each prompt, taking the most likely
    character each time (prompts of one length are run as one batch)."""
    positive_int("n_chars", n_chars)
    out = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        ids = torch.tensor([tokenizer.encode(prompts[i]) for i in rows])
        # the whole sequence at every step, no cache: the same sums as a forward pass
        ids = generate(model, ids, n_chars, greedy=True, use_cache=False)
        for r, i in enumerate(rows):
            out[i] = tokenizer.decode(ids[r, -n_chars:].tolist())
    return out


# -----------------------------------------------------------------------------
# 3. calibration

def _check_confidence(confidence, correct) -> tuple[torch.Tensor, torch.Tensor]:
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    correct = torch.as_tensor(correct).flatten()
    if confidence.numel() == 0 or confidence.shape != correct.shape:
        raise ValueError(f"confidence and correct must be non-empty and of one length, got "
                         f"{confidence.numel()} and {correct.numel()}")
    if not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1] (a probability)")
    if not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must hold 0/1 or True/False")
    return confidence, correct.to(torch.float64)


def reliability_bins(confidence, correct, n_bins: int = 10) -> dict[str, torch.Tensor]:
    """Split [0, 1] into ``n_bins`` equal bins of confidence (the last one closed: a confidence
    of 1 lands in it) and return, per bin, ``count``, ``confidence`` (the mean confidence of
    its answers) and ``accuracy`` (their share right); both NaN in an empty bin. Also ``edges``
    (n_bins + 1). A calibrated model's accuracy equals its confidence in every bin."""
    positive_int("n_bins", n_bins)
    confidence, correct = _check_confidence(confidence, correct)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    which = (confidence[:, None] >= edges[None, 1:-1]).sum(-1)         # bin b: [b/n, (b+1)/n)
    member = (which[:, None] == torch.arange(n_bins)[None, :]).to(torch.float64)  # (N, n_bins)
    count = member.sum(0)
    conf_sum, right_sum = confidence @ member, correct @ member
    return {"edges": edges,
            "count": count.long(), "confidence": conf_sum / count, "accuracy": right_sum / count}


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017): sum over the bins of (share of answers in the bin) x
    |accuracy - mean confidence|. 0 for a calibrated model; 0.9 for one that is always 90%
    sure and always wrong."""
    bins = reliability_bins(confidence, correct, n_bins)
    full = bins["count"] > 0
    share = bins["count"][full].double() / bins["count"].sum()
    gap = (bins["accuracy"][full] - bins["confidence"][full]).abs()
    return float((share * gap).sum())


def coverage_accuracy(confidence, correct, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer only when the confidence is at least the threshold, abstain otherwise: for each
    threshold the ``coverage`` (share answered) and the ``accuracy`` of the answers given
    (NaN where nothing is answered)."""
    confidence, correct = _check_confidence(confidence, correct)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    answered = confidence[None, :] >= thresholds[:, None]               # (n_thresholds, N)
    n = answered.sum(-1).to(torch.float64)
    coverage = n / confidence.numel()
    accuracy = (answered * correct[None, :]).sum(-1) / n
    return coverage, accuracy


# -----------------------------------------------------------------------------
# 4. context windows

@torch.no_grad()
def loss_by_position(model, ids: torch.Tensor, T: int, n_windows: int = 64,
                     batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """The mean next-token loss at each position 0..T-1 of ``n_windows`` random windows of
    ``T`` tokens of ``ids`` (1-D): a (T,) tensor. Past the length a model was trained on, it
    shows whether its position scheme carries over."""
    token_ids(ids, "ids", ndim=1, shape="1-D")
    positive_int("T", T)
    positive_int("n_windows", n_windows)
    positive_int("batch_size", batch_size)
    if len(ids) < T + 1:
        raise ValueError(f"ids has {len(ids)} tokens; a window of {T} needs {T + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - T, (n_windows,), generator=gen)
    offsets = torch.arange(T + 1)
    device = model_device(model)
    total = torch.zeros(T, dtype=torch.float64)
    with eval_mode(model):
        for lo in range(0, n_windows, batch_size):
            windows = ids[starts[lo:lo + batch_size, None] + offsets].long().to(device)
            logits, _ = model(windows[:, :-1])
            loss = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:],
                                   reduction="none")                       # (B, T)
            total += loss.sum(0).double().cpu()
    return (total / n_windows).float()
