"""lessons_lib.limitations: the facts world and its batches, asking a model, calibration
against direct loops, loss by position, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.limitations import (CAPITALS, PAD, choice_probs, coverage_accuracy,
                                     expected_calibration_error, fact_text, facts_batch_fn,
                                     greedy_answers, loss_by_position, make_facts_world,
                                     make_names, note_text, question_text,
                                     reliability_bins)
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.tokenizers import CharTokenizer

TOK = CharTokenizer(sorted(set(PAD + "abcdefghijklmnopqrstuvwxyz .:=;")))


# -- the facts world --------------------------------------------------------------------------

def test_names_are_distinct_pronounceable_and_reproducible():
    names = make_names(500, seed=3)
    assert len(set(names)) == 500 and all(len(n) == 6 for n in names)
    assert all(n[i] in "aeiou" for n in names for i in (1, 3, 5))
    assert make_names(500, seed=3) == names and make_names(500, seed=4) != names


def test_capitals_start_with_distinct_letters():
    assert len(CAPITALS) == 20 and len({c[0] for c in CAPITALS}) == 20


def test_world_splits_names():
    w = make_facts_world(n_seen=40, n_unseen=30, seed=1)
    assert len(w.seen) == 40 and len(w.unseen) == 30 and not set(w.seen) & set(w.unseen)
    assert set(w.city) == set(w.seen) | set(w.unseen) and set(w.city.values()) <= set(CAPITALS)
    assert len(set(w.city.values())) > 10                       # spread over the capitals
    assert make_facts_world(n_seen=40, n_unseen=30, seed=1).city == w.city


def test_batches_hold_the_sentences_and_mask_padding_and_names():
    w = make_facts_world(n_seen=20, n_unseen=5, seed=0)
    batch_fn = facts_batch_fn(w, TOK, batch_size=16, p_note=0.4)
    gen = torch.Generator().manual_seed(0)
    pad = TOK.encode(PAD)[0]
    kinds = {"fact": 0, "note": 0}
    for _ in range(50):
        x, y = batch_fn("train", gen)
        assert x.shape == y.shape and x.shape[0] == 16
        batch_kinds = set()
        for row_x, row_y in zip(x, y):
            text = TOK.decode(row_x.tolist()).rstrip(PAD)
            assert text.startswith(PAD)
            s, n_real = text[1:], len(text)
            assert (row_y[:6] == -100).all()                   # the first name: no loss
            assert (row_y[n_real - 1:] == -100).all() and (row_x[n_real:] == pad).all()
            torch.testing.assert_close(row_y[6:n_real - 1], row_x[7:n_real])   # shifted by one
            assert TOK.decode([int(row_y[n_real - 2])]) == "."                 # ends the sentence
            name = s[:6]
            assert name in w.seen
            if "=" in s:
                told = s[7:s.index(";")]
                assert s == note_text(name, told) + fact_text(name, told) and told in CAPITALS
                batch_kinds.add("note")
            else:
                assert s == fact_text(name, w.city[name])
                batch_kinds.add("fact")
        assert len(batch_kinds) == 1                           # one kind per batch
        kinds[batch_kinds.pop()] += 1
    assert 10 < kinds["note"] < 30, kinds


# -- asking the model -----------------------------------------------------------------------

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=48, n_layer=1, n_head=2,
                         n_embd=16)).eval()


def test_choice_probs_is_the_renormalised_next_character_distribution():
    model = tiny_model()
    prompts = [PAD + question_text("kovira"), PAD + note_text("tesalu", "oslo") + question_text("tesalu")]
    cands = ["oslo", "lima", "paris"]
    got = choice_probs(model, TOK, prompts, cands)
    for i, p in enumerate(prompts):                         # one prompt at a time, no padding
        logits, _ = model(torch.tensor([TOK.encode(p)]))
        logp = F.log_softmax(logits[0, -1], -1)
        want = logp[[TOK.encode(c[0])[0] for c in cands]].softmax(-1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_greedy_answers_take_the_argmax_each_step():
    model = tiny_model(1)
    prompts = [PAD + "kovira: ", PAD + "ab: ", PAD + "tesalu=oslo; tesalu: "]
    got = greedy_answers(model, TOK, prompts, 4)
    for p, g in zip(prompts, got):
        ids = TOK.encode(p)
        for _ in range(4):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
        assert g == TOK.decode(ids[-4:])


# -- calibration ------------------------------------------------------------------------------

def direct_ece(conf, correct, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == n_bins - 1 and c == 1.0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            mean_conf = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / len(conf) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_equals_a_direct_loop(seed):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(300, generator=g)
    conf[:5] = 1.0
    correct = (torch.rand(300, generator=g) < conf).tolist()
    for n_bins in (1, 10, 15):
        assert math.isclose(expected_calibration_error(conf, correct, n_bins),
                            direct_ece(conf.tolist(), correct, n_bins), abs_tol=1e-9)


def test_ece_of_known_cases():
    assert expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_reliability_bins_count_every_answer_once():
    bins = reliability_bins([0.05, 0.15, 0.12, 1.0, 0.95], [1, 0, 1, 1, 0], n_bins=10)
    assert bins["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins["accuracy"][1] == 0.5 and math.isnan(bins["accuracy"][2])
    assert bins["confidence"][9] == pytest.approx(0.975)
    assert len(bins["edges"]) == 11


def test_coverage_accuracy_by_hand():
    conf = [0.2, 0.5, 0.9, 0.95]
    correct = [0, 1, 0, 1]
    coverage, accuracy = coverage_accuracy(conf, correct, [0.0, 0.5, 0.92, 0.99])
    assert coverage.tolist() == [1.0, 0.75, 0.25, 0.0]
    assert accuracy[:3].tolist() == [0.5, pytest.approx(2 / 3), 1.0] and math.isnan(accuracy[3])


# -- loss by position -------------------------------------------------------------------------

def test_loss_by_position_equals_a_direct_loop():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=20, n_layer=1, n_head=2, n_embd=16,
                          positions="alibi")).eval()
    ids = torch.randint(0, 11, (300,))
    got = loss_by_position(model, ids, 20, n_windows=10, batch_size=3, seed=5)
    starts = torch.randint(300 - 20, (10,), generator=torch.Generator().manual_seed(5))
    want = torch.zeros(20)
    for s in starts.tolist():
        logits, _ = model(ids[s:s + 20][None])
        want += F.cross_entropy(logits[0], ids[s + 1:s + 21], reduction="none")
    torch.testing.assert_close(got, want / 10, rtol=1e-5, atol=1e-5)


# -- bad input --------------------------------------------------------------------------------

def test_bad_input_raises_value_errors():
    with pytest.raises(ValueError, match="names"):
        make_names(10 ** 6, length=2)
    with pytest.raises(ValueError, match="cities"):
        make_facts_world(n_seen=10, n_unseen=2, cities=("oslo", "oslo"))
    w = make_facts_world(n_seen=10, n_unseen=2)
    with pytest.raises(ValueError, match="probability"):
        facts_batch_fn(w, TOK, p_note=1.5)
    with pytest.raises(ValueError, match="block_size"):
        facts_batch_fn(w, TOK, block_size=8)("train", torch.Generator())
    model = tiny_model()
    with pytest.raises(ValueError, match="distinct"):
        choice_probs(model, TOK, [PAD], ["oslo", "orly"])
    with pytest.raises(ValueError, match="one length"):
        expected_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="0/1"):
        coverage_accuracy([0.5], [2], [0.5])
    with pytest.raises(ValueError, match="needs"):
        loss_by_position(model, torch.arange(10) % 5, 20)
