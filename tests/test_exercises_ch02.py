"""Chapter 02's checkers accept correct solutions and reject plausible wrong ones, saying why."""

from collections import Counter

import pytest
import regex

from lessons_lib.exercises import (CheckFailed, check_bpe_decode, check_bpe_encode, check_merge,
                                   check_train_bpe)
from lessons_lib.tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer

# -- correct solutions ----------------------------------------------------------------------


def bpe_decode(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in merges.items():
        vocab[new_id] = vocab[a] + vocab[b]
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


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
    check_bpe_decode(bpe_decode)
    check_merge(merge)
    check_train_bpe(train_bpe)
    check_bpe_encode(bpe_encode)
    out = capsys.readouterr().out
    for name in ("check_bpe_decode", "check_merge", "check_train_bpe", "check_bpe_encode"):
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


def test_bpe_decode_rejects_decoding_each_token_on_its_own():
    def per_token(ids, merges):
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = vocab[a] + vocab[b]
        return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)
    with pytest.raises(CheckFailed, match="join the bytes of all the tokens first"):
        check_bpe_decode(per_token)


def test_bpe_decode_rejects_strict_decoding_and_keeps_the_traceback():
    def strict(ids, merges):
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = vocab[a] + vocab[b]
        return b"".join(vocab[i] for i in ids).decode("utf-8")
    with pytest.raises(CheckFailed, match=r"raised UnicodeDecodeError(.|\n)*errors='replace'") as info:
        check_bpe_decode(strict)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_bpe_decode_rejects_pairs_joined_the_wrong_way_round():
    def reversed_pairs(ids, merges):
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = vocab[b] + vocab[a]
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    with pytest.raises(CheckFailed, match="bytes of 104 followed by the bytes of 105"):
        check_bpe_decode(reversed_pairs)


def test_bpe_decode_rejects_merged_ids_built_from_bytes_only():
    def one_level(ids, merges):                      # forgets that a merged id can hold merged ids
        vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in merges.items():
            vocab[new_id] = bytes([a % 256, b % 256])
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
    with pytest.raises(CheckFailed, match=r"aaabdaaabac(.|\n)*in the order the merges were learned"):
        check_bpe_decode(one_level)


def test_encode_and_decode_failures_print_a_line_that_rebuilds_the_case():
    def drops_last(ids, merges):                      # wrong only on the longer cases
        return bpe_decode(ids[:-1] if len(ids) > 5 else ids, merges)
    with pytest.raises(CheckFailed, match="To rerun this case") as info:
        check_bpe_decode(drops_last)
    line = str(info.value).split("To rerun this case: ")[1].split("\n")[0]
    scope = {}
    exec(line, scope)
    assert isinstance(scope["merges"], dict)
    assert bpe_decode(scope["ids"], scope["merges"]) == "The miller and the river."


def test_the_references_agree_with_the_library():
    from lessons_lib.exercises import ch02
    tok = BPETokenizer().train(ch02._HIDDEN_TEXT, 400)
    assert len(ch02.example_merges()) == len(tok.merges) == 144    # ties may be broken apart
    check_train_bpe(lambda text, vocab_size: ch02._train_reference(text, vocab_size))
    for text in ["The miller and the river.", "東京 🙂 naïve", "the mill  42,   Zebra", ""]:
        assert ch02._encode_reference(text, tok.merges) == tok.encode(text)
        assert bpe_decode(tok.encode(text), tok.merges) == tok.decode(tok.encode(text)) == text
    assert ch02._merge_reference([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]


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
