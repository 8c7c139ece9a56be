"""lessons_lib.bigram against plain Python counting and PyTorch's own cross-entropy."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lessons_lib.bigram import (BigramLanguageModel, bigram_counts, bigram_nll, bigram_probs,
                                perplexity, sample_bigram)

sequences = st.integers(1, 9).flatmap(
    lambda v: st.tuples(st.just(v), st.lists(st.integers(0, v - 1), min_size=2, max_size=200)))


# -----------------------------------------------------------------------------
# counting


@settings(max_examples=60, deadline=None)
@given(sequences)
def test_counts_match_a_python_counter(vocab_and_ids):
    vocab_size, ids = vocab_and_ids
    counts = bigram_counts(torch.tensor(ids), vocab_size)
    expected = Counter(zip(ids[:-1], ids[1:]))
    assert counts.shape == (vocab_size, vocab_size)
    assert counts.dtype == torch.int64
    nonzero = {(i, j): int(counts[i, j]) for i in range(vocab_size) for j in range(vocab_size)
               if counts[i, j] > 0}
    assert nonzero == dict(expected)


@settings(max_examples=60, deadline=None)
@given(sequences)
def test_counts_add_up_to_the_number_of_pairs_and_rows_to_the_current_tokens(vocab_and_ids):
    vocab_size, ids = vocab_and_ids
    counts = bigram_counts(ids, vocab_size)            # a plain list works too
    assert int(counts.sum()) == len(ids) - 1
    assert counts.sum(dim=1).tolist() == torch.bincount(torch.tensor(ids[:-1]), minlength=vocab_size).tolist()
    assert counts.sum(dim=0).tolist() == torch.bincount(torch.tensor(ids[1:]), minlength=vocab_size).tolist()


def test_counts_are_not_symmetric():
    counts = bigram_counts(torch.tensor([0, 1, 1]), 2)
    assert counts.tolist() == [[0, 1], [0, 1]]


@settings(max_examples=40, deadline=None)
@given(sequences, st.sampled_from([0.1, 0.5, 1.0, 2.0]))
def test_probs_rows_sum_to_one_and_follow_add_k(vocab_and_ids, k):
    vocab_size, ids = vocab_and_ids
    counts = bigram_counts(ids, vocab_size)
    probs = bigram_probs(counts, smoothing=k)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=1), torch.ones(vocab_size), atol=1e-6)
    i, j = ids[0], ids[1]
    assert math.isclose(float(probs[i, j]),
                        (int(counts[i, j]) + k) / (int(counts[i].sum()) + k * vocab_size), rel_tol=1e-6)
    assert (probs > 0).all()


def test_unsmoothed_probs_are_relative_frequencies():
    counts = torch.tensor([[3, 1], [0, 2]])
    assert torch.allclose(bigram_probs(counts, smoothing=0), torch.tensor([[0.75, 0.25], [0.0, 1.0]]))


def test_nll_equals_pytorch_cross_entropy_on_log_probabilities():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(12, (500,), generator=g)
    probs = bigram_probs(bigram_counts(ids[:300], 12), smoothing=0.5)
    expected = F.cross_entropy(probs.double().log()[ids[300:-1]], ids[301:])
    assert math.isclose(bigram_nll(probs, ids[300:]), float(expected), rel_tol=1e-7)


def test_nll_of_a_uniform_table_is_ln_v_and_an_unseen_pair_costs_infinity():
    ids = torch.tensor([0, 4, 2, 2, 1, 3])
    assert math.isclose(bigram_nll(torch.full((5, 5), 0.2), ids), math.log(5), rel_tol=1e-6)
    no_smoothing = bigram_probs(bigram_counts(torch.tensor([0, 1, 0, 1]), 2), smoothing=0)
    assert bigram_nll(no_smoothing, torch.tensor([0, 1])) == 0.0
    assert math.isinf(bigram_nll(no_smoothing, torch.tensor([0, 0])))


def test_perplexity_is_exp_of_the_loss():
    assert perplexity(0.0) == 1.0
    assert math.isclose(perplexity(math.log(64)), 64.0, rel_tol=1e-12)
    assert math.isclose(perplexity(torch.tensor(2.5)), math.exp(2.5), rel_tol=1e-6)
    assert perplexity(math.inf) == math.inf
    assert perplexity(1000.0) == math.inf


# -----------------------------------------------------------------------------
# sampling


def test_sampling_follows_a_deterministic_table():
    table = torch.zeros(4, 4)
    table[0, 2] = table[2, 1] = table[1, 3] = table[3, 0] = 1.0
    assert sample_bigram(table, 0, 8) == [2, 1, 3, 0, 2, 1, 3, 0]
    assert sample_bigram(table, 3, 0) == []


def test_sampling_is_repeatable_and_matches_the_table():
    table = torch.tensor([[0.0, 0.75, 0.25], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    first = sample_bigram(table, 0, 4000, generator=torch.Generator().manual_seed(3))
    again = sample_bigram(table, 0, 4000, generator=torch.Generator().manual_seed(3))
    assert first == again
    counts = bigram_counts([0] + first, 3).double()
    freq = counts / counts.sum(dim=1, keepdim=True)
    assert (counts[table == 0] == 0).all()                  # never a step of probability zero
    assert torch.allclose(freq, table.double(), atol=0.05)


# -----------------------------------------------------------------------------
# the neural bigram


def test_model_forward_is_a_row_lookup_and_its_loss_is_pytorchs():
    torch.manual_seed(0)
    model = BigramLanguageModel(7)
    idx = torch.randint(7, (3, 5))
    targets = torch.randint(7, (3, 5))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 5, 7)
    assert torch.equal(logits, model.logits_table.weight[idx])
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    assert model(idx)[1] is None
    assert torch.allclose(model.probs().sum(dim=1), torch.ones(7))


def test_model_with_log_count_weights_has_the_count_models_loss():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, (400,), generator=g)
    probs = bigram_probs(bigram_counts(ids, 6), smoothing=1.0)
    model = BigramLanguageModel(6)
    with torch.no_grad():
        model.logits_table.weight.copy_(probs.log())
    _, loss = model(ids[None, :-1], ids[None, 1:])
    assert math.isclose(loss.item(), bigram_nll(probs, ids), rel_tol=1e-5)
    assert torch.allclose(model.probs(), probs, atol=1e-6)


@pytest.mark.slow
def test_training_the_model_reaches_the_count_model():
    # a Markov chain with a known table; gradient descent on cross-entropy should find it
    torch.manual_seed(0)
    true = torch.softmax(2 * torch.randn(5, 5), dim=-1)
    ids = torch.tensor([0] + sample_bigram(true, 0, 2000, generator=torch.Generator().manual_seed(0)))
    counted = bigram_probs(bigram_counts(ids, 5), smoothing=0)
    model = BigramLanguageModel(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    for _ in range(100):
        _, loss = model(ids[None, :-1], ids[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(loss.item() - bigram_nll(counted, ids)) < 2e-3
    assert torch.allclose(model.probs(), counted, atol=0.02)


def test_generate_extends_every_row_and_only_uses_the_last_token():
    model = BigramLanguageModel(4)
    with torch.no_grad():                      # a deterministic table: i -> (i + 1) % 4
        model.logits_table.weight.fill_(-1e4)
        for i in range(4):
            model.logits_table.weight[i, (i + 1) % 4] = 0.0
    out = model.generate(torch.tensor([[3, 0], [1, 2]]), 5)
    assert out.tolist() == [[3, 0, 1, 2, 3, 0, 1], [1, 2, 3, 0, 1, 2, 3]]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_model = BigramLanguageModel(4)
    start = torch.zeros(2, 1, dtype=torch.long)
    assert torch.equal(random_model.generate(start, 20, g1), random_model.generate(start, 20, g2))


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("ids, vocab_size, message", [
    (torch.tensor([0, 1]), 0, "vocab_size must be a positive int"),
    (torch.tensor([0, 1]), 2.0, "vocab_size must be a positive int"),
    (torch.tensor([[0, 1], [1, 0]]), 2, "must be 1-D"),
    (torch.tensor([0.0, 1.0]), 2, "integer tensor"),
    (torch.tensor([True, False]), 2, "integer tensor"),
    ([0, 1.5], 2, "integer token ids"),
    ("ab", 2, "1-D tensor or a list"),
    (torch.tensor([0]), 2, "at least 2 token ids"),
    (torch.tensor([], dtype=torch.long), 2, "at least 2 token ids"),
    (torch.tensor([0, 2]), 2, r"must lie in 0\.\.1"),
    (torch.tensor([-1, 0]), 2, r"must lie in 0\.\.1"),
])
def test_counts_reject_bad_input(ids, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        bigram_counts(ids, vocab_size)


@pytest.mark.parametrize("counts, smoothing, message", [
    ([[1, 2], [3, 4]], 1.0, "must be a torch.Tensor"),
    (torch.ones(2, 3), 1.0, "square"),
    (torch.ones(2), 1.0, "square"),
    (torch.ones(0, 0), 1.0, "square"),
    (torch.ones(2, 2, dtype=torch.bool), 1.0, "real numbers"),
    (torch.tensor([[1, -1], [0, 1]]), 1.0, "negative"),
    (torch.ones(2, 2), -0.5, "smoothing"),
    (torch.ones(2, 2), math.nan, "smoothing"),
    (torch.ones(2, 2), "1", "smoothing"),
    (torch.tensor([[1, 1], [0, 0]]), 0, "row 1 of counts is all zero"),
])
def test_probs_reject_bad_input(counts, smoothing, message):
    with pytest.raises(ValueError, match=message):
        bigram_probs(counts, smoothing)


def test_nll_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        bigram_nll(torch.ones(2, 3) / 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must lie in"):
        bigram_nll(torch.full((2, 2), 0.5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="at least 2"):
        bigram_nll(torch.full((2, 2), 0.5), torch.tensor([1]))


@pytest.mark.parametrize("loss, message", [
    (-0.1, ">= 0"), (math.nan, ">= 0"), ("2.0", "must be a number"), (True, "must be a number"),
    (torch.tensor([1.0, 2.0]), "single number"),
])
def test_perplexity_rejects_bad_input(loss, message):
    with pytest.raises(ValueError, match=message):
        perplexity(loss)


@pytest.mark.parametrize("probs, start, n, message", [
    (torch.full((2, 2), 0.5), 2, 3, "start must be a token id"),
    (torch.full((2, 2), 0.5), -1, 3, "start must be a token id"),
    (torch.full((2, 2), 0.5), 0.0, 3, "start must be a token id"),
    (torch.full((2, 2), 0.5), 0, -1, "num_tokens"),
    (torch.full((2, 2), 0.5), 0, 2.0, "num_tokens"),
    (torch.ones(2, 2, dtype=torch.long), 0, 3, "floating-point"),
    (torch.full((2, 3), 0.5), 0, 3, "square"),
])
def test_sampling_rejects_bad_input(probs, start, n, message):
    with pytest.raises(ValueError, match=message):
        sample_bigram(probs, start, n)


def test_model_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        BigramLanguageModel(0)
    model = BigramLanguageModel(3)
    with pytest.raises(ValueError, match="integer tensor of token ids"):
        model([0, 1])
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        model(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.tensor([[0, 1]]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"targets must lie in 0\.\.2"):
        model(torch.tensor([[0, 1]]), torch.tensor([[1, 7]]))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model.generate(torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.tensor([[0]]), -1)
