"""Chapter 1's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch01 import (check_bigram_counts, check_cross_entropy, check_make_batch,
                                        check_perplexity, check_sample_bigram)

# -----------------------------------------------------------------------------
# bigram counts


def counts_right(ids, vocab_size):
    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.long)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.long), accumulate=True)
    return counts


def test_counts_accepts_a_correct_answer(capsys):
    check_bigram_counts(counts_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_counts_accepts_float_counts_from_a_python_loop():
    def loop(ids, vocab_size):
        counts = torch.zeros(vocab_size, vocab_size)
        for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()):
            counts[a, b] += 1
        return counts
    check_bigram_counts(loop)


def test_counts_rejects_a_transposed_table():
    with pytest.raises(CheckFailed, match="transposed"):
        check_bigram_counts(lambda ids, v: counts_right(ids, v).T)


def test_counts_rejects_set_semantics_that_count_a_repeated_pair_once():
    def once(ids, vocab_size):
        return (counts_right(ids, vocab_size) > 0).long()
    with pytest.raises(CheckFailed, match="neighbouring pairs"):
        check_bigram_counts(once)


def test_counts_rejects_a_table_sized_by_the_largest_id():
    def too_small(ids, vocab_size):
        return counts_right(ids, int(ids.max()) + 1)
    with pytest.raises(CheckFailed, match="shape"):
        check_bigram_counts(too_small)


def test_counts_reports_a_crash_with_the_case():
    def crash(ids, vocab_size):
        raise IndexError("boom")
    with pytest.raises(CheckFailed, match=r"check 1 of 4 .* raised IndexError: boom"):
        check_bigram_counts(crash)


def test_checker_refuses_a_called_function():
    with pytest.raises(CheckFailed, match="pass your function itself"):
        check_bigram_counts(counts_right(torch.tensor([0, 1]), 2))


# -----------------------------------------------------------------------------
# cross-entropy


def cross_entropy_right(logits, targets):
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -log_probs[torch.arange(len(targets)), targets].mean()


def test_cross_entropy_accepts_a_stable_answer_and_pytorchs(capsys):
    check_cross_entropy(cross_entropy_right)
    check_cross_entropy(F.cross_entropy)
    assert capsys.readouterr().out.count("all 6 checks passed") == 2


def test_cross_entropy_rejects_a_naive_softmax_that_overflows():
    def naive(logits, targets):
        probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
        return -probs[torch.arange(len(targets)), targets].log().mean()
    with pytest.raises(CheckFailed, match=r"large logits.*\n.*got (nan|inf)"):
        check_cross_entropy(naive)


def test_cross_entropy_rejects_log_softmax_over_the_wrong_dimension():
    def wrong_dim(logits, targets):
        return -F.log_softmax(logits, dim=0)[torch.arange(len(targets)), targets].mean()
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(wrong_dim)


def test_cross_entropy_rejects_a_sum_and_a_missing_mean():
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(lambda lg, t: F.cross_entropy(lg, t, reduction="sum"))
    with pytest.raises(CheckFailed, match="forget to average"):
        check_cross_entropy(lambda lg, t: F.cross_entropy(lg, t, reduction="none"))


def test_cross_entropy_rejects_a_missing_minus_sign():
    with pytest.raises(CheckFailed, match="expected about"):
        check_cross_entropy(lambda lg, t: -cross_entropy_right(lg, t))


# -----------------------------------------------------------------------------
# perplexity


def perplexity_right(probs, ids):
    return torch.exp(-probs[ids[:-1], ids[1:]].log().mean())


def test_perplexity_accepts_a_correct_answer(capsys):
    check_perplexity(perplexity_right)
    check_perplexity(lambda p, ids: float(perplexity_right(p, ids)))
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


def test_perplexity_rejects_a_transposed_lookup():
    with pytest.raises(CheckFailed, match="expected about"):
        check_perplexity(lambda p, ids: torch.exp(-p[ids[1:], ids[:-1]].log().mean()))


def test_perplexity_rejects_the_sum_instead_of_the_mean():
    with pytest.raises(CheckFailed, match="expected about"):
        check_perplexity(lambda p, ids: torch.exp(-p[ids[:-1], ids[1:]].log().sum()))


def test_perplexity_rejects_returning_the_loss_or_base_two():
    with pytest.raises(CheckFailed, match="expected about"):
        check_perplexity(lambda p, ids: -p[ids[:-1], ids[1:]].log().mean())
    with pytest.raises(CheckFailed, match="expected about"):
        check_perplexity(lambda p, ids: 2 ** (-p[ids[:-1], ids[1:]].log().mean()))


# -----------------------------------------------------------------------------
# sampling


def sample_right(probs, start, num_tokens, generator):
    out, current = [], start
    for _ in range(num_tokens):
        current = torch.multinomial(probs[current], 1, generator=generator).item()
        out.append(current)
    return out


def test_sampling_accepts_a_correct_answer_as_list_or_tensor(capsys):
    check_sample_bigram(sample_right)
    check_sample_bigram(lambda *args: torch.tensor(sample_right(*args), dtype=torch.long))
    assert capsys.readouterr().out.count("all 4 checks passed") == 2


def test_sampling_rejects_reading_columns():
    def columns(probs, start, num_tokens, generator):
        return sample_right(probs.T.contiguous(), start, num_tokens, generator)
    with pytest.raises(CheckFailed, match="column instead of a row"):
        check_sample_bigram(columns)


def test_sampling_rejects_greedy_argmax():
    def greedy(probs, start, num_tokens, generator):
        out, current = [], start
        for _ in range(num_tokens):
            current = int(probs[current].argmax())
            out.append(current)
        return out
    with pytest.raises(CheckFailed, match="argmax"):
        check_sample_bigram(greedy)


def test_sampling_rejects_including_the_start_token():
    with pytest.raises(CheckFailed, match="do not include the start token"):
        check_sample_bigram(lambda p, s, n, g: [s] + sample_right(p, s, n, g))


def test_sampling_rejects_ignoring_the_generator():
    def unseeded(probs, start, num_tokens, generator):
        return sample_right(probs, start, num_tokens, None)
    with pytest.raises(CheckFailed, match="generator=generator"):
        check_sample_bigram(unseeded)


def test_sampling_rejects_uniform_draws_that_ignore_the_table():
    def uniform(probs, start, num_tokens, generator):
        return torch.randint(len(probs), (num_tokens,), generator=generator).tolist()
    with pytest.raises(CheckFailed):
        check_sample_bigram(uniform)


# -----------------------------------------------------------------------------
# batches


def make_batch_right(data, starts, block_size):
    offsets = torch.arange(block_size)
    return data[starts[:, None] + offsets], data[starts[:, None] + offsets + 1]


def test_make_batch_accepts_a_correct_answer(capsys):
    check_make_batch(make_batch_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_make_batch_rejects_unshifted_targets():
    with pytest.raises(CheckFailed, match="targets equal the inputs"):
        check_make_batch(lambda d, s, b: (make_batch_right(d, s, b)[0],) * 2)


def test_make_batch_rejects_targets_one_token_short():
    def short(data, starts, block_size):
        inputs = torch.stack([data[s:s + block_size] for s in starts.tolist()])
        targets = torch.stack([data[s + 1:s + block_size] for s in starts.tolist()])
        return inputs, targets
    with pytest.raises(CheckFailed, match="targets of shape"):
        check_make_batch(short)


def test_make_batch_rejects_windows_stacked_as_columns():
    def columns(data, starts, block_size):
        inputs, targets = make_batch_right(data, starts, block_size)
        return inputs.T, targets.T
    with pytest.raises(CheckFailed, match="rows are windows"):
        check_make_batch(columns)


def test_make_batch_rejects_targets_shifted_the_wrong_way():
    def backwards(data, starts, block_size):
        inputs, _ = make_batch_right(data, starts, block_size)
        return inputs, data[(starts[:, None] + torch.arange(block_size) - 1).clamp_min(0)]
    with pytest.raises(CheckFailed, match="inputs are right but the targets are not"):
        check_make_batch(backwards)
