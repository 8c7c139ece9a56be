"""lessons_lib.tokenizers against tiktoken's GPT-2 encoding and against a slow, obvious BPE."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lessons_lib
from lessons_lib.data import load_shakespeare
from lessons_lib.tokenizers import (GPT2_ENDOFTEXT, BPETokenizer, CharTokenizer, _merge,
                                    bytes_to_unicode, tiktoken_gpt2)

VARIED = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Numbers: 1234567, 3.14159, 2026-11-23, $1,000,000.00, 007",
    "Emoji 🤖🎉👩‍👩‍👧 and accents: café, naïve, Ærøskøbing",
    "Русский текст, 中文文本, हिन्दी पाठ, Ελληνικά, العربية, 日本語のテキスト",
    "runs of spaces:     five,\t\ttabs,\n\n\nnewlines   ",
    "I'm sure they'll say it's 'quoted' and we've DONE it, HE'D SAY",
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("tiktoken")
    return tiktoken_gpt2()


@pytest.fixture(scope="module")
def shakespeare_bpe():
    return BPETokenizer().train(load_shakespeare()[:200_000], 512)


# -- CharTokenizer ------------------------------------------------------------------------

CHARS = "abc xyz\nHELO!?'"


@given(st.text(alphabet=CHARS))
def test_char_round_trip(s):
    tok = CharTokenizer.from_text(CHARS)
    ids = tok.encode(s)
    assert len(ids) == len(s) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_char_vocabulary_is_sorted_and_complete():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.chars == sorted(set("hello world"))
    assert tok.decode(torch.tensor(tok.encode("hello"))) == "hello"


def test_char_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match="integer ids"):
        tok.decode([0.5])
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "a"])


# -- BPE: training ------------------------------------------------------------------------

def naive_bpe_merges(text, vocab_size, pattern):
    """Textbook BPE: recount every pair after every merge. Ties go to the smaller pair."""
    import regex
    chunks = [list(c.encode("utf-8")) for c in regex.findall(pattern, text)]
    merges = {}
    for new_id in range(256, vocab_size):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], [-kv[0][0], -kv[0][1]]))[0]
        merges[best] = new_id
        chunks = [_merge(ids, best, new_id) for ids in chunks]
    return merges


TRAINING_TEXTS = {"shakespeare": lambda: load_shakespeare()[:30_000],    # loaded in the test
                  "repeats": lambda: "aaaa aaaa aaab ab ab ab ba " * 20,
                  "scripts": lambda: VARIED[5] * 3}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_TEXTS)
def test_incremental_training_equals_naive_bpe(name):
    text = TRAINING_TEXTS[name]()
    fast = BPETokenizer().train(text, 400)
    assert fast.merges == naive_bpe_merges(text, 400, fast.pattern)


def test_training_compresses_and_round_trips(shakespeare_bpe):
    assert shakespeare_bpe.vocab_size == 512 and len(shakespeare_bpe.merges) == 256
    held_out = load_shakespeare()[-50_000:]
    ids = shakespeare_bpe.encode(held_out)
    assert shakespeare_bpe.decode(ids) == held_out
    assert len(held_out.encode()) / len(ids) > 1.7     # 1.87 measured; bytes alone give 1.0
    first_pair = next(iter(shakespeare_bpe.merges))
    assert shakespeare_bpe.vocab[256] == bytes(first_pair)


def test_training_stops_when_nothing_is_left_to_merge():
    tok = BPETokenizer().train("ab", 1000)
    assert tok.vocab_size == 257 and tok.encode("ab") == [256]


def test_training_errors():
    with pytest.raises(ValueError, match=">= 256"):
        BPETokenizer().train("hello", 255)
    with pytest.raises(ValueError, match="empty text"):
        BPETokenizer().train("", 300)
    with pytest.raises(ValueError, match="str"):
        BPETokenizer().train(None, 300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_arbitrary_unicode(shakespeare_bpe, s):
    assert shakespeare_bpe.decode(shakespeare_bpe.encode(s)) == s


def test_save_and_load(tmp_path, shakespeare_bpe):
    path = tmp_path / "tok.json"
    shakespeare_bpe.save(path)
    loaded = BPETokenizer.load(path)
    for s in VARIED:
        assert loaded.encode(s) == shakespeare_bpe.encode(s)
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a tokenizer written by BPETokenizer"):
        BPETokenizer.load(tmp_path / "other.json")


def test_bpe_errors(shakespeare_bpe):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        shakespeare_bpe.decode([512])
    with pytest.raises(ValueError, match="integer ids"):
        shakespeare_bpe.decode(["a"])
    with pytest.raises(ValueError, match="not valid Unicode"):
        shakespeare_bpe.encode("lone surrogate \ud800")


# -- BPE: the real GPT-2 vocabulary against tiktoken ----------------------------------------

def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    mapping = bytes_to_unicode()
    assert len(set(mapping.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in mapping.values())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ"


def test_gpt2_vocabulary_size_and_a_known_encoding(gpt2):
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("text", VARIED)
def test_gpt2_equals_tiktoken_on_varied_text(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)


@pytest.mark.slow
def test_gpt2_equals_tiktoken_on_a_large_corpus(gpt2, reference):
    sources = [p.read_text() for p in sorted(Path(lessons_lib.__file__).parent.rglob("*.py"))]
    sources += [p.read_text() for p in sorted(Path(torch.__file__).parent.joinpath("nn", "modules").glob("*.py"))[:20]]
    corpus = load_shakespeare() + "\n".join(sources)
    assert gpt2.encode_ordinary(corpus) == reference.encode_ordinary(corpus)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_gpt2_equals_tiktoken_on_random_text(gpt2, reference, s):
    assert gpt2.encode_ordinary(s) == reference.encode_ordinary(s)
    assert gpt2.decode(gpt2.encode_ordinary(s)) == s


def test_endoftext_only_when_allowed(gpt2, reference):
    text = f"first document{GPT2_ENDOFTEXT}second document"
    assert gpt2.encode(text, allowed_special={GPT2_ENDOFTEXT}) == reference.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special="all")[2] == 50256
    with pytest.raises(ValueError, match="special token"):
        gpt2.encode(text)
    assert gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="unknown special tokens"):
        gpt2.encode(text, allowed_special={"<|fim|>"})


def test_add_special_tokens_takes_the_next_ids_and_round_trips():
    tok = BPETokenizer().train("low lower lowest " * 20, 260)
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    assert tok.special_tokens == {"<|endoftext|>": 260, "<|pad|>": 261} and tok.vocab_size == 262
    ids = tok.encode("low<|endoftext|>", allowed_special="all")
    assert ids[-1] == 260 and tok.decode(ids) == "low<|endoftext|>"
    assert BPETokenizer.from_dict(tok.to_dict()).encode("lowest<|pad|>", allowed_special="all") == \
        tok.encode("lowest<|pad|>", allowed_special="all")
    with pytest.raises(ValueError, match="already a special token"):
        tok.add_special_tokens(["<|pad|>"])
    with pytest.raises(ValueError, match="non-empty string"):
        tok.add_special_tokens([""])
    with pytest.raises(ValueError, match="not a tokenizer written by BPETokenizer"):
        BPETokenizer.from_dict({"format": "something else"})
