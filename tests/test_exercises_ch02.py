"""Chapter 02's checkers accept correct solutions and reject plausible wrong ones, saying why."""

from collections import Counter

import pytest
import regex

from lessons_lib.exercises import (CheckFailed, check_bpe_encode, check_bytes_per_token, check_merge,
                                   check_train_bpe)
from lessons_lib.tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer

# -- correct solutions ----------------------------------------------------------------------


def bytes_per_token(tokenizer, text):
    return len(text.encode("utf-8")) / len(tokenizer.encode(text))


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(text, vocab_size):
    chunks = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunks.items()]
    merges = {}
    for new_id in range(256, vocab_size):
        counts = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] += n
        if not counts:
            break
        pair = max(counts, key=counts.get)
        merges[pair] = new_id
        words = [(merge(ids, pair, new_id), n) for ids, n in words]
    return merges


def bpe_encode(text, merges):
    ids = []
    for chunk in regex.findall(GPT2_SPLIT_PATTERN, text):
        chunk_ids = list(chunk.encode("utf-8"))
        while len(chunk_ids) >= 2:
            pair = min(zip(chunk_ids, chunk_ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            chunk_ids = merge(chunk_ids, pair, merges[pair])
        ids.extend(chunk_ids)
    return ids


def test_correct_solutions_pass(capsys):
    check_bytes_per_token(bytes_per_token)
    check_merge(merge)
    check_train_bpe(train_bpe)
    check_bpe_encode(bpe_encode)
    out = capsys.readouterr().out
    for name in ("check_bytes_per_token", "check_merge", "check_train_bpe", "check_bpe_encode"):
        assert f"{name}: all" in out and "checks passed" in out


def test_other_correct_solutions_pass():
    # the library's own trainer breaks ties differently from max(): the replay accepts any tie-break
    check_train_bpe(lambda text, vocab_size: BPETokenizer().train(text, vocab_size).merges)

    # min-count-first tie-break: among equally frequent pairs take the last one seen
    def train_last_tie(text, vocab_size):
        chunks = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
        words = [(list(c.encode("utf-8")), n) for c, n in chunks.items()]
        merges = {}
        for new_id in range(256, vocab_size):
            counts = Counter()
            for ids, n in words:
                for pair in zip(ids, ids[1:]):
                    counts[pair] += n
            if not counts:
                break
            best = max(counts.values())
            pair = [p for p, c in counts.items() if c == best][-1]
            merges[pair] = new_id
            words = [(merge(ids, pair, new_id), n) for ids, n in words]
        return merges
    check_train_bpe(train_last_tie)

    # applying every merge once, in learned order, encodes the same as the lowest-rank loop
    def encode_in_merge_order(text, merges):
        ids = []
        for chunk in regex.findall(GPT2_SPLIT_PATTERN, text):
            chunk_ids = list(chunk.encode("utf-8"))
            for pair, new_id in merges.items():
                chunk_ids = merge(chunk_ids, pair, new_id)
            ids.extend(chunk_ids)
        return ids
    check_bpe_encode(encode_in_merge_order)


def test_not_a_function_is_rejected():
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check_merge(merge([1, 2], (1, 2), 3))


# -- wrong answers --------------------------------------------------------------------------


def test_bytes_per_token_rejects_characters_instead_of_bytes():
    with pytest.raises(CheckFailed, match="count bytes, not characters"):
        check_bytes_per_token(lambda tok, text: len(text) / len(tok.encode(text)))


def test_bytes_per_token_rejects_tokens_per_byte():
    with pytest.raises(CheckFailed, match="not yet"):
        check_bytes_per_token(lambda tok, text: len(tok.encode(text)) / len(text.encode("utf-8")))


def test_merge_rejects_overlapping_matches():
    def merge_overlapping(ids, pair, new_id):        # forgets to skip the second id of a match
        out = []
        for i in range(len(ids)):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
            elif i > 0 and (ids[i - 1], ids[i]) == pair:
                continue
            else:
                out.append(ids[i])
        return out
    with pytest.raises(CheckFailed, match=r"\[1, 1, 1\]") as info:
        check_merge(merge_overlapping)
    assert "i + 2" in str(info.value)


def test_merge_rejects_dropping_the_last_id():
    def merge_stops_early(ids, pair, new_id):
        out, i = [], 0
        while i < len(ids) - 1:
            if (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        return out
    with pytest.raises(CheckFailed, match="not yet"):
        check_merge(merge_stops_early)


def test_merge_rejects_changing_the_input():
    def merge_in_place(ids, pair, new_id):
        i = 0
        while i < len(ids) - 1:
            if (ids[i], ids[i + 1]) == pair:
                ids[i:i + 2] = [new_id]
            i += 1
        return ids
    with pytest.raises(CheckFailed, match="changed the list it was given"):
        check_merge(merge_in_place)


def test_merge_rejects_unordered_pairs():
    def merge_either_order(ids, pair, new_id):
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and {ids[i], ids[i + 1]} == set(pair):
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        return out
    with pytest.raises(CheckFailed, match="a pair is ordered"):
        check_merge(merge_either_order)


def test_train_bpe_rejects_counting_across_chunks():
    def train_without_split(text, vocab_size):
        ids = list(text.encode("utf-8"))
        merges = {}
        for new_id in range(256, vocab_size):
            counts = Counter(zip(ids, ids[1:]))
            if not counts:
                break
            pair = max(counts, key=counts.get)
            merges[pair] = new_id
            ids = merge(ids, pair, new_id)
        return merges
    with pytest.raises(CheckFailed, match="never occurs inside one chunk"):
        check_train_bpe(train_without_split)


def test_train_bpe_rejects_running_past_the_last_pair():
    def train_no_early_stop(text, vocab_size):
        chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT2_SPLIT_PATTERN, text)]
        merges = {}
        for new_id in range(256, vocab_size):
            counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))
            pair = max(counts, key=counts.get)       # ValueError once counts is empty
            merges[pair] = new_id
            chunks = [merge(ids, pair, new_id) for ids in chunks]
        return merges
    with pytest.raises(CheckFailed, match="stop early"):
        check_train_bpe(train_no_early_stop)


def test_train_bpe_rejects_a_less_frequent_pair():
    def train_least_frequent(text, vocab_size):
        chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT2_SPLIT_PATTERN, text)]
        merges = {}
        for new_id in range(256, vocab_size):
            counts = Counter(p for ids in chunks for p in zip(ids, ids[1:]))
            if not counts:
                break
            pair = min(counts, key=counts.get)
            merges[pair] = new_id
            chunks = [merge(ids, pair, new_id) for ids in chunks]
        return merges
    with pytest.raises(CheckFailed, match="merge the most frequent pair"):
        check_train_bpe(train_least_frequent)


def test_train_bpe_rejects_wrong_new_ids():
    with pytest.raises(CheckFailed, match="should create id 256"):
        check_train_bpe(lambda text, vocab_size: {p: i + 1 for p, i in train_bpe(text, vocab_size).items()})


def test_train_bpe_rejects_a_list_of_pairs():
    with pytest.raises(CheckFailed, match="expected a dict"):
        check_train_bpe(lambda text, vocab_size: list(train_bpe(text, vocab_size)))


def test_bpe_encode_rejects_merging_across_chunks():
    def encode_without_split(text, merges):
        ids = list(text.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        return ids
    with pytest.raises(CheckFailed, match="runs of spaces"):
        check_bpe_encode(encode_without_split)


def test_bpe_encode_rejects_the_latest_merge_first():
    def encode_latest_first(text, merges):
        ids = []
        for chunk in regex.findall(GPT2_SPLIT_PATTERN, text):
            chunk_ids = list(chunk.encode("utf-8"))
            while True:
                present = [p for p in zip(chunk_ids, chunk_ids[1:]) if p in merges]
                if not present:
                    break
                pair = max(present, key=merges.get)
                chunk_ids = merge(chunk_ids, pair, merges[pair])
            ids.extend(chunk_ids)
        return ids
    with pytest.raises(CheckFailed, match="learned first"):
        check_bpe_encode(encode_latest_first)


def test_bpe_encode_rejects_one_pass_per_chunk():
    def encode_one_pass(text, merges):               # merges the best pair once, then stops
        ids = []
        for chunk in regex.findall(GPT2_SPLIT_PATTERN, text):
            chunk_ids = list(chunk.encode("utf-8"))
            pairs = [p for p in zip(chunk_ids, chunk_ids[1:]) if p in merges]
            if pairs:
                pair = min(pairs, key=merges.get)
                chunk_ids = merge(chunk_ids, pair, merges[pair])
            ids.extend(chunk_ids)
        return ids
    with pytest.raises(CheckFailed, match="not yet"):
        check_bpe_encode(encode_one_pass)
