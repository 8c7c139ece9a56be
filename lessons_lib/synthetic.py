"""Generated tasks whose answers are known exactly, for experiments that need a clean signal."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .checks import is_int


def copy_task(batch_size: int, n_copy: int, vocab_size: int, generator: torch.Generator | None = None):
    """Sequences ``x_1 .. x_n DELIM x_1 .. x_n``: after the delimiter the model must repeat the
    first half. Symbols are ``0 .. vocab_size - 1``; the delimiter is ``vocab_size``, so a model
    needs ``vocab_size + 1`` embeddings.

    Returns ``(inputs, targets)`` of shape ``(batch_size, 2 * n_copy)``; targets are inputs
    shifted by one, with ``-100`` (PyTorch's ignore index) everywhere except the copied half.
    """
    if batch_size < 1 or n_copy < 1 or vocab_size < 2:
        raise ValueError(f"need batch_size >= 1, n_copy >= 1 and vocab_size >= 2, "
                         f"got {batch_size}, {n_copy}, {vocab_size}")
    symbols = torch.randint(vocab_size, (batch_size, n_copy), generator=generator)
    delim = torch.full((batch_size, 1), vocab_size)
    seq = torch.cat([symbols, delim, symbols], dim=1)          # (B, 2n + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : n_copy] = -100                                 # nothing to predict before the delimiter
    return inputs, targets


# -----------------------------------------------------------------------------
# "The cat sat on the mat because it was tired": which noun does "it" mean?
#
# Every sentence names one animal and one object, then says "it" was something. The
# adjective decides the referent: an animal gets tired or hungry, an object gets dirty or
# wet. Half the animals and half the objects appear only as the FIRST noun in training and
# the other half only as the SECOND; the held-out split swaps the two halves, so a model
# that answers from positions ("it" is always the first noun) fails there, and one that
# answers from meaning (the adjective fits an animal, and this noun is an animal) succeeds.

ANIMALS = (
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "mouse", "fox",
    "wolf", "bear", "lion", "tiger", "deer", "duck", "goose", "hen", "owl", "parrot",
    "frog", "monkey", "donkey", "camel", "zebra", "puppy", "kitten", "pony", "hamster", "squirrel",
)
OBJECTS = (
    "mat", "chair", "table", "box", "bed", "rug", "sofa", "bench", "blanket", "pillow",
    "basket", "bucket", "bottle", "cup", "plate", "bowl", "carpet", "towel", "ladder", "bicycle",
    "car", "shelf", "lamp", "book", "hat", "coat", "boot", "tent", "fence", "wagon",
)
ANIMAL_ADJECTIVES = ("tired", "hungry", "sleepy", "thirsty", "scared", "angry", "bored", "lonely")
OBJECT_ADJECTIVES = ("dirty", "wet", "broken", "dusty", "cracked", "rusty", "torn", "slippery")
VERBS = ("sat", "slept", "lay", "stood", "waited", "hid", "rested", "played")
PREPOSITIONS = ("on", "near", "by", "beside", "behind", "under")

# Sentence shapes. {n1} and {n2} are the two nouns (either may be the animal), {adj} decides
# which one "it" means. The prefixes move every position, so no position is always a noun.
REFERENT_TEMPLATES = (
    "the {n1} {verb} {prep} the {n2} because it was {adj}",
    "the {n1} {verb} {prep} the {size} {n2} because it was very {adj}",
    "the {size} {n1} {verb} {prep} the {n2} all day because it was {adj}",
    "yesterday the {n1} {verb} {prep} the {n2} because it was {adj}",
    "later that day the {n1} {verb} {prep} the {size} {n2} since it was {adj}",
    "early this morning the {size} {n1} {verb} {prep} the {n2} and then it was {adj}",
    "because it was {adj} the {n1} {verb} {prep} the {n2}",
    "it was {adj} so the {size} {n1} {verb} {prep} the {n2}",
)
# Words that fit an animal and an object alike, so they never decide the referent.
SIZES = ("big", "small", "old", "little")
PAD = "<pad>"


@dataclass
class ReferentSplit:
    """One split of the task; row ``i`` of every tensor describes sentence ``i``.

    ``tokens`` (N, T) word ids, right-padded with the id of ``<pad>`` (0);
    ``it_index`` (N,) position of "it"; ``noun_positions`` (N, 2) positions of the first and
    the second noun; ``referent`` (N,) 0 or 1, which of the two nouns "it" means;
    ``label`` (N,) the referent as an index into :attr:`ReferentTask.nouns`.
    """
    sentences: list[str]
    tokens: torch.Tensor
    it_index: torch.Tensor
    noun_positions: torch.Tensor
    referent: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def padding_mask(self) -> torch.Tensor:
        """(N, T) bool, True at real words, False at padding."""
        return self.tokens != 0


@dataclass
class ReferentTask:
    """The vocabulary, the noun roles and the two splits of :func:`referent_sentences`."""
    vocab: list[str]                       # id -> word; vocab[0] is "<pad>", the nouns come last
    nouns: list[str]                       # label -> noun: the animals, then the objects;
                                           # vocab[-len(nouns):] == nouns, so label = id - offset
    animals: list[str]
    objects: list[str]
    first_in_train: list[str]              # nouns that are only ever the first noun in training
    second_in_train: list[str]             # ... only ever the second noun in training
    train: ReferentSplit
    heldout: ReferentSplit
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.stoi = {w: i for i, w in enumerate(self.vocab)}

    @property
    def block_size(self) -> int:
        return self.train.tokens.shape[1]

    def encode(self, sentence: str) -> list[int]:
        """Word ids of a sentence written with this task's words (lower case, spaces)."""
        words = sentence.split()
        unknown = [w for w in words if w not in self.stoi]
        if unknown:
            raise ValueError(f"words not in the vocabulary: {unknown}")
        return [self.stoi[w] for w in words]

    def decode(self, ids) -> list[str]:
        """Words of a row of ids, padding dropped."""
        return [self.vocab[int(i)] for i in ids if int(i) != 0]


def _make_split(rng: random.Random, n: int, first: list[str], second: list[str],
                animals: set[str], stoi: dict[str, int], noun_index: dict[str, int],
                block_size: int) -> ReferentSplit:
    """``n`` sentences whose first noun comes from ``first`` and second from ``second``,
    always one animal and one object, the adjective chosen for a random one of the two."""
    first_animals = [w for w in first if w in animals]
    first_objects = [w for w in first if w not in animals]
    second_animals = [w for w in second if w in animals]
    second_objects = [w for w in second if w not in animals]
    sentences, rows, its, nouns, refs, labels = [], [], [], [], [], []
    for _ in range(n):
        if rng.random() < 0.5:                    # animal first, object second
            n1, n2 = rng.choice(first_animals), rng.choice(second_objects)
        else:                                     # object first, animal second
            n1, n2 = rng.choice(first_objects), rng.choice(second_animals)
        ref = rng.randrange(2)                    # which noun "it" will mean
        adjectives = ANIMAL_ADJECTIVES if (n1, n2)[ref] in animals else OBJECT_ADJECTIVES
        template = rng.choice(REFERENT_TEMPLATES)
        text = template.format(n1=n1, n2=n2, verb=rng.choice(VERBS), prep=rng.choice(PREPOSITIONS),
                               size=rng.choice(SIZES), adj=rng.choice(adjectives))
        words = text.split()
        slots = template.split()                  # one slot per word, so slot index = word position
        p1, p2, pit = slots.index("{n1}"), slots.index("{n2}"), slots.index("it")
        sentences.append(text)
        rows.append([stoi[w] for w in words] + [0] * (block_size - len(words)))
        its.append(pit)
        nouns.append((p1, p2))
        refs.append(ref)
        labels.append(noun_index[(n1, n2)[ref]])
    return ReferentSplit(
        sentences=sentences,
        tokens=torch.tensor(rows, dtype=torch.long),
        it_index=torch.tensor(its, dtype=torch.long),
        noun_positions=torch.tensor(nouns, dtype=torch.long),
        referent=torch.tensor(refs, dtype=torch.long),
        label=torch.tensor(labels, dtype=torch.long),
    )


def referent_sentences(n_train: int = 4000, n_heldout: int = 1000, seed: int = 0,
                       n_animals: int = 30, n_objects: int = 30) -> ReferentTask:
    """Sentences like "the cat sat on the mat because it was tired", with the answer to
    "which noun does *it* mean?".

    The first ``n_animals`` animals and ``n_objects`` objects of :data:`ANIMALS` and
    :data:`OBJECTS` are used (at least 2 of each, at most 30). A seeded shuffle gives half
    of each kind the first-noun role in training and the other half the second-noun role;
    the held-out split swaps the roles, so no held-out noun ever held its held-out role in
    training. The same seed gives the same task.
    """
    for name, value in (("n_train", n_train), ("n_heldout", n_heldout), ("seed", seed),
                        ("n_animals", n_animals), ("n_objects", n_objects)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be >= 1, got {n_train} and {n_heldout}")
    if not 2 <= n_animals <= len(ANIMALS):
        raise ValueError(f"n_animals must be between 2 and {len(ANIMALS)}, got {n_animals}")
    if not 2 <= n_objects <= len(OBJECTS):
        raise ValueError(f"n_objects must be between 2 and {len(OBJECTS)}, got {n_objects}")

    rng = random.Random(seed)
    animals, objects = list(ANIMALS[:n_animals]), list(OBJECTS[:n_objects])
    shuffled_animals, shuffled_objects = rng.sample(animals, len(animals)), rng.sample(objects, len(objects))
    half_a, half_o = len(animals) // 2, len(objects) // 2
    first = shuffled_animals[:half_a] + shuffled_objects[:half_o]
    second = shuffled_animals[half_a:] + shuffled_objects[half_o:]

    nouns = animals + objects
    words = {w for t in REFERENT_TEMPLATES for w in t.split() if not w.startswith("{")}
    words |= set(ANIMAL_ADJECTIVES) | set(OBJECT_ADJECTIVES) | set(VERBS) | set(PREPOSITIONS) | set(SIZES)
    vocab = [PAD] + sorted(words) + nouns
    stoi = {w: i for i, w in enumerate(vocab)}
    noun_index = {w: i for i, w in enumerate(nouns)}
    block_size = max(len(t.split()) for t in REFERENT_TEMPLATES)

    animal_set = set(animals)
    train = _make_split(rng, n_train, first, second, animal_set, stoi, noun_index, block_size)
    heldout = _make_split(rng, n_heldout, second, first, animal_set, stoi, noun_index, block_size)
    return ReferentTask(vocab=vocab, nouns=nouns, animals=animals, objects=objects,
                        first_in_train=first, second_in_train=second, train=train, heldout=heldout)
