"""Checkers for chapter 02's exercises: bytes per token, one BPE merge, BPE training, BPE encoding.

Each checker grades a learner's function on inputs the learner does not see. The BPE checkers
compare with ``lessons_lib.tokenizers`` (encoding) or replay the learner's merges on the text
and check that every merge picked a most frequent pair (training), so any tie-break passes.
"""

from __future__ import annotations

import random
from collections import Counter

import regex

from ..tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer, CharTokenizer
from ..tokenizers import _merge as _reference_merge
from ._core import Case, CheckFailed, compare_close, compare_equal, run_cases  # noqa: F401

__all__ = ["check_bytes_per_token", "check_merge", "check_train_bpe", "check_bpe_encode"]

_split = regex.compile(GPT2_SPLIT_PATTERN)

# A hidden training text for the BPE checkers (written for this course; repetitive on purpose,
# so that merges have something to find).
_HIDDEN_TEXT = """\
The river runs past the mill and the mill wheel turns all day. The miller and his daughter
watch the water; the water never stops, and the wheel never stops either. In the evening the
miller counts the sacks of flour: ten, twenty, thirty, forty. "There is more flour than there
was yesterday," says the daughter, "and there will be more tomorrow." The miller laughs. He
has heard that before, and he knows the river better than anyone in the town.
When the rain comes the river rises, and the wheel turns faster, and the flour pours out of
the stones like snow. When the summer is dry the river shrinks, the wheel slows down, and the
miller sits on the bench beside the door and waits. Waiting, he says, is also work.
At night he sings the old song of the mill:
    Turn, wheel, turn; the water will not wait.
    Turn, wheel, turn; the flour is in the sack.
    Turn, wheel, turn; the river brings it back.
"""


def _pair_text(vocab: dict[int, bytes], pair: tuple[int, int]) -> str:
    a, b = pair
    return (f"{vocab[a].decode('utf-8', errors='backslashreplace')!r} + "
            f"{vocab[b].decode('utf-8', errors='backslashreplace')!r}")


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


# -- exercise 1: bytes per token ----------------------------------------------------------------

def check_bytes_per_token(fn) -> None:
    """Grade ``fn(tokenizer, text) -> float``: UTF-8 bytes of ``text`` per token of ``tokenizer.encode(text)``."""
    __tracebackhide__ = True
    trained = BPETokenizer().train(_HIDDEN_TEXT, 320)
    latin = CharTokenizer.from_text(_HIDDEN_TEXT)
    chars = CharTokenizer.from_text("añoñ東京🙂 ")

    def case(description, tokenizer, text, hint=""):
        expected = len(text.encode("utf-8")) / len(tokenizer.encode(text))
        return Case(description, (tokenizer, text), expected, hint=hint, compare=compare_close(rtol=1e-9, atol=1e-12))

    non_ascii = ("count bytes, not characters: len(text.encode('utf-8')). A character such as "
                 "'ñ' is 2 bytes, '東' is 3 and '🙂' is 4.")
    cases = [
        case("a character-level tokenizer on plain English (1 byte per character)", latin,
             "The river runs past the mill."),
        case("a small BPE tokenizer on English", trained, "The miller and his daughter watch the water.",
             hint="divide the number of bytes by the number of tokens, not the other way round"),
        case("a character-level tokenizer on 'año 東京 🙂'", chars, "año 東京 🙂", hint=non_ascii),
        case("a small BPE tokenizer on text with accents, Chinese and an emoji", trained,
             "The mill in 東京 turns: año tras año 🙂", hint=non_ascii),
    ]
    run_cases("check_bytes_per_token", fn, cases)


# -- exercise 2: one merge ----------------------------------------------------------------------

def check_merge(fn) -> None:
    """Grade ``fn(ids, pair, new_id) -> list``: every occurrence of ``pair`` replaced by ``new_id``,
    left to right, without overlaps, and the input list left unchanged."""
    __tracebackhide__ = True
    if not callable(fn):
        run_cases("check_merge", fn, [])                # explains that a function is expected

    def untouched(ids, pair, new_id):
        copy = list(ids)
        result = fn(copy, pair, new_id)
        return result, copy

    def case(description, ids, pair, new_id, hint=""):
        expected = _reference_merge(ids, pair, new_id)

        def compare(got, _expected, ids=ids):
            result, after = got
            if after != ids:
                return (f"your function changed the list it was given: {ids} became {after}. "
                        f"Build and return a new list instead.")
            return compare_equal(result, expected)
        return Case(f"{description}: merge({ids}, {pair}, {new_id})", (ids, pair, new_id), None,
                    hint=hint, compare=compare)

    overlap = ("when the pair is found at position i, append new_id and jump to i + 2, so a token "
               "is never used by two merges: [1, 1, 1] with pair (1, 1) becomes [new_id, 1].")
    rng = random.Random(2)
    long_ids = [rng.choice([7, 8, 9]) for _ in range(60)]
    cases = [
        case("two separate occurrences", [5, 6, 7, 5, 6], (5, 6), 99),
        case("a pair at the very end", [3, 1, 2], (1, 2), 256,
             hint="do not stop one position early: the last two ids can form the pair too."),
        case("the pair in the wrong order only", [2, 1, 2, 1], (1, 2), 300,
             hint="a pair is ordered: (1, 2) means 1 followed by 2."),
        case("three equal ids (overlapping pairs)", [1, 1, 1], (1, 1), 9, hint=overlap),
        case("four equal ids", [4, 4, 4, 4], (4, 4), 10, hint=overlap),
        case("a single id", [7], (7, 7), 11, hint="a list with fewer than two ids has no pairs: return it as it is."),
        case("an empty list", [], (1, 2), 12, hint="an empty list has no pairs: return []."),
        case("a random list of 60 ids", long_ids, (8, 8), 500, hint=overlap),
    ]
    run_cases("check_merge", untouched, cases)


# -- exercise 3: training -----------------------------------------------------------------------

def _replay_problem(text: str, vocab_size: int, merges) -> str | None:
    """Replay ``merges`` on ``text`` and return what is wrong with them, or None."""
    if not isinstance(merges, dict):
        return f"expected a dict {{(a, b): new_id, ...}}, got a {type(merges).__name__}"
    words = [list(chunk.encode("utf-8")) for chunk in _split.findall(text)]
    counts_of_chunk = Counter(map(tuple, words))
    words = [list(w) for w in counts_of_chunk]
    freqs = list(counts_of_chunk.values())
    vocab = {i: bytes([i]) for i in range(256)}
    for k, (pair, new_id) in enumerate(merges.items()):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, int) for x in pair)):
            return f"merge number {k + 1}: the key should be a pair of ids like (116, 104), got {pair!r}"
        if new_id != 256 + k:
            return (f"merge number {k + 1} should create id {256 + k} (new ids count up from 256 in "
                    f"the order the merges are learned), but it creates {new_id!r}")
        counts: Counter = Counter()
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                counts[p] += f
        if not counts:
            return (f"merge number {k + 1} ({pair}) comes after every chunk has become a single "
                    f"token; stop as soon as no pair is left")
        if pair[0] not in vocab or pair[1] not in vocab:
            return f"merge number {k + 1} uses an id that does not exist yet: {pair}"
        best = max(counts.values())
        got = counts.get(pair, 0)
        if got == 0:
            return (f"merge number {k + 1} is {_pair_text(vocab, pair)}, a pair that never occurs "
                    f"inside one chunk at that point. Did you split the text with GPT2_SPLIT_PATTERN "
                    f"and count pairs only inside each chunk, and apply every earlier merge?")
        if got < best:
            top = max(counts, key=counts.get)
            return (f"merge number {k + 1} is {_pair_text(vocab, pair)}, which occurs {_times(got)}, "
                    f"but {_pair_text(vocab, top)} occurs {_times(best)}: merge the most frequent pair")
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        words = [_reference_merge(w, pair, new_id) for w in words]
    wanted = vocab_size - 256
    if len(merges) < wanted:
        left = any(len(w) > 1 for w in words)
        if left:
            return (f"expected {wanted} merges for vocab_size={vocab_size}, got {len(merges)}, "
                    f"though pairs are still left to merge")
    if len(merges) > wanted:
        return f"expected at most {wanted} merges for vocab_size={vocab_size}, got {len(merges)}"
    return None


def check_train_bpe(fn) -> None:
    """Grade ``fn(text, vocab_size) -> dict``: BPE merges learned from ``text``.

    The merges are replayed on the text: each must be a most frequent pair (any tie-break is
    fine) counted inside GPT-2's chunks, with new ids 256, 257, ... in order."""
    __tracebackhide__ = True

    def case(description, text, vocab_size, hint=""):
        def compare(got, _expected):
            return _replay_problem(text, vocab_size, got)
        return Case(description, (text, vocab_size), None, hint=hint, compare=compare)

    cases = [
        case("the classic example 'aaabdaaabac' with vocab_size=259", "aaabdaaabac", 259),
        case("vocab_size=256 (no merges at all)", "hello hello", 256,
             hint="vocab_size counts the 256 byte tokens, so you learn vocab_size - 256 merges."),
        case("a short story with vocab_size=300", _HIDDEN_TEXT, 300,
             hint="count pairs inside each chunk of regex.findall(GPT2_SPLIT_PATTERN, text), never "
                  "across two chunks, and apply each merge to every chunk before counting again."),
        case("'aaaa aaaa' with vocab_size=300 (it runs out of pairs after 3 merges)", "aaaa aaaa", 300,
             hint="stop early when every chunk has become a single token (no pair is left)."),
        case("text with accents, Chinese and emoji, vocab_size=280",
             "naïve café 東京 東京 東京 🙂🙂 🙂🙂 naïve", 280,
             hint="work on the UTF-8 bytes of each chunk: list(chunk.encode('utf-8'))."),
    ]
    run_cases("check_train_bpe", fn, cases)


# -- exercise 4: encoding -----------------------------------------------------------------------

def check_bpe_encode(fn) -> None:
    """Grade ``fn(text, merges) -> list[int]`` against ``BPETokenizer.encode`` with the same merges."""
    __tracebackhide__ = True
    tok = BPETokenizer().train(_HIDDEN_TEXT, 400)

    def case(description, text, hint=""):
        return Case(f"{description}: {text!r}", (text, dict(tok.merges)), tok.encode(text), hint=hint)

    rank_hint = ("in each chunk, repeatedly merge the pair whose merge was learned first (the lowest "
                 "new id, merges[pair]), until no pair of the chunk is in merges.")
    cases = [
        case("a sentence like the training text", "The miller and the river.", hint=rank_hint),
        case("a word the merges have never seen whole", "Thereafter", hint=rank_hint),
        case("runs of spaces", "the mill  42,   Zebra    wheel",
             hint="split the text with regex.findall(GPT2_SPLIT_PATTERN, text) first and encode each "
                  "chunk on its own: merges never cross chunk boundaries."),
        case("several lines", "The wheel turns.\nThe river rises.\n\nWaiting, he says, is work.", hint=rank_hint),
        case("characters outside the training text", "東京 🙂 naïve miller", hint=rank_hint),
        case("an empty text", "", hint="no text, no tokens: return []."),
    ]
    run_cases("check_bpe_encode", fn, cases)
