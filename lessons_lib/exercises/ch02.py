"""Checkers for chapter 02's exercises: decoding with a merge table, one BPE merge, BPE
training, BPE encoding.

Each checker grades a learner's function on inputs the learner does not see, against references
written here: a plain merge loop, a trainer that recounts every pair, an encoder that applies the
merges in the order they were learned, and a decoder that rebuilds every token's bytes. None of
them calls ``lessons_lib.tokenizers``' BPE code, the thing the exercises teach. The training
checker replays the learner's merges and checks that each picked a most frequent pair, so any
tie-break passes.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache

import regex

from ..tokenizers import GPT2_SPLIT_PATTERN
from ._core import Case, compare_equal, run_cases

__all__ = ["check_bpe_decode", "check_merge", "check_train_bpe", "check_bpe_encode"]

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


# -- references (independent of lessons_lib.tokenizers' BPE) ------------------------------------

def _merge_reference(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of ``pair``, left to right."""
    out, k = [], 0
    while k < len(ids):
        if ids[k:k + 2] == list(pair):
            out.append(new_id)
            k += 2
        else:
            out.append(ids[k])
            k += 1
    return out


def _train_reference(text: str, vocab_size: int) -> dict[tuple[int, int], int]:
    """Recount every pair after every merge (slow and plain); ties go to the pair seen first."""
    chunks = [list(c.encode("utf-8")) for c in _split.findall(text)]
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, vocab_size):
        counts: Counter = Counter()
        for ids in chunks:
            counts.update(zip(ids, ids[1:]))
        if not counts:
            break
        pair = max(counts, key=counts.get)
        merges[pair] = new_id
        chunks = [_merge_reference(ids, pair, new_id) for ids in chunks]
    return merges


def _encode_reference(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Apply every merge once, in the order it was learned, to each chunk's bytes. This equals
    "repeatedly merge the earliest-learned pair present": a pair made of ids that only exist
    after merge k can only be merged after k."""
    ids: list[int] = []
    for chunk in _split.findall(text):
        chunk_ids = list(chunk.encode("utf-8"))
        for pair, new_id in merges.items():
            if len(chunk_ids) < 2:
                break
            chunk_ids = _merge_reference(chunk_ids, pair, new_id)
        ids.extend(chunk_ids)
    return ids


def _token_bytes(merges: dict[tuple[int, int], int]) -> dict[int, bytes]:
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in merges.items():
        vocab[new_id] = vocab[a] + vocab[b]
    return vocab


@lru_cache(maxsize=None)
def _example_merges(vocab_size: int) -> tuple:
    return tuple(_train_reference(_HIDDEN_TEXT, vocab_size).items())


def example_merges(vocab_size: int = 400) -> dict[tuple[int, int], int]:
    """The merge table the encode and decode checkers use (learned from their hidden text), so
    that a learner can rerun a failing case: ``from lessons_lib.exercises.ch02 import
    example_merges``."""
    return dict(_example_merges(vocab_size))


def _pair_text(vocab: dict[int, bytes], pair: tuple[int, int]) -> str:
    a, b = pair
    return (f"{vocab[a].decode('utf-8', errors='backslashreplace')!r} + "
            f"{vocab[b].decode('utf-8', errors='backslashreplace')!r}")


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


# -- exercise 1: decoding with a merge table ----------------------------------------------------

def check_bpe_decode(fn) -> None:
    """Grade ``fn(ids, merges) -> str``: the bytes of every id rebuilt from the merge table
    (ids 0-255 are single bytes, ``merges[(a, b)] = c`` makes c the bytes of a then b), joined,
    and decoded as UTF-8 with ``errors="replace"``."""
    __tracebackhide__ = True
    merges = example_merges()
    toy = _train_reference("aaabdaaabac", 259)

    def expected(ids, table):
        return b"".join(_token_bytes(table)[i] for i in ids).decode("utf-8", errors="replace")

    def rebuild(ids):
        return f"from lessons_lib.exercises.ch02 import example_merges; ids, merges = {ids}, example_merges()"

    join_first = ("join the bytes of all the tokens first and decode once: a character's bytes can be "
                  "split over several tokens, and decoding each token on its own breaks it.")
    replace = ("decode with .decode('utf-8', errors='replace'): ids may stop in the middle of a "
               "character, and those bytes must become the replacement character '\ufffd', not an error.")
    nested = ("a merged id can be made of merged ids: build the bytes of every new id in the order "
              "the merges were learned, vocab[new_id] = vocab[a] + vocab[b], starting from "
              "vocab[i] = bytes([i]).")
    cases = []

    def case(description, ids, table, hint="", rebuild_line=""):
        cases.append(Case(description, (list(ids), dict(table)), expected(ids, table), hint=hint,
                          rebuild=rebuild_line))

    case("byte ids only, no merges: [72, 105, 33]", [72, 105, 33], {},
         hint="ids below 256 are single bytes: bytes([72]) is b'H'")
    case("one merge {(104, 105): 256} and ids [256, 33]", [256, 33], {(104, 105): 256},
         hint="id 256 stands for the bytes of 104 followed by the bytes of 105")
    toy_ids = _encode_reference("aaabdaaabac", toy)
    case(f"'aaabdaaabac' encoded with its own merges {toy} as {toy_ids}", toy_ids, toy, hint=nested)
    for text in ["The miller and the river.", "When the rain comes, the wheel turns faster.",
                 "Turn, wheel, turn;\n    the flour is in the sack."]:
        ids = _encode_reference(text, merges)
        case(f"{len(ids)} ids of the sentence {text!r} (merges learned from a hidden story)", ids, merges,
             hint=nested, rebuild_line=rebuild(ids))
    emoji = list("🙂".encode("utf-8"))
    case(f"the four byte tokens of one emoji, {emoji}", emoji, {}, hint=join_first)
    mixed = _encode_reference("東京 🙂 naïve miller", merges)
    case(f"{len(mixed)} ids of '東京 🙂 naïve miller' (merges learned from a hidden story)",
         mixed, merges, hint=join_first, rebuild_line=rebuild(mixed))
    case(f"the first two bytes of the emoji alone, {emoji[:2]}", emoji[:2], {}, hint=replace)
    cut = _encode_reference("na", merges) + ["ï".encode("utf-8")[0]]
    case("the tokens of 'naïve' cut after the first byte of 'ï'", cut, merges, hint=replace,
         rebuild_line=rebuild(cut))
    case("no ids at all", [], merges, hint="no ids, no text: return ''",
         rebuild_line=rebuild([]))
    run_cases("check_bpe_decode", fn, cases)


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
        expected = _merge_reference(ids, pair, new_id)

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
        words = [_merge_reference(w, pair, new_id) for w in words]
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
    """Grade ``fn(text, merges) -> list[int]``: GPT-2's chunks, each encoded from its bytes by
    merging the earliest-learned pair until none applies; compared with an encoder written here
    that applies every merge once, in learned order (the same result, another algorithm)."""
    __tracebackhide__ = True
    merges = example_merges()

    def case(description, text, hint=""):
        return Case(f"{description}: {text!r}", (text, dict(merges)), _encode_reference(text, merges),
                    hint=hint,
                    rebuild=(f"from lessons_lib.exercises.ch02 import example_merges; "
                             f"text, merges = {text!r}, example_merges()"))

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
