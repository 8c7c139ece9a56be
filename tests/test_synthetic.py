"""Generated tasks: shapes, exact answers, determinism, and the held-out split's promise."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lessons_lib.synthetic import (ANIMAL_ADJECTIVES, ANIMALS, OBJECT_ADJECTIVES, OBJECTS,
                                   REFERENT_TEMPLATES, copy_task, referent_sentences)


# ----------------------------------------------------------------------------- copy_task

def test_copy_task_layout():
    g = torch.Generator().manual_seed(0)
    inputs, targets = copy_task(batch_size=5, n_copy=7, vocab_size=16, generator=g)
    assert inputs.shape == targets.shape == (5, 14)
    assert (inputs[:, 7] == 16).all()                               # the delimiter
    assert (inputs[:, :7] < 16).all()
    assert (targets[:, :7] == -100).all()                           # nothing to predict before it
    assert torch.equal(targets[:, 7:], inputs[:, :7])               # after it: the first half again


@pytest.mark.parametrize("args", [(0, 4, 8), (2, 0, 8), (2, 4, 1)])
def test_copy_task_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        copy_task(*args)


# ----------------------------------------------------------------------------- referent_sentences

@pytest.fixture(scope="module")
def task():
    return referent_sentences(n_train=2000, n_heldout=500, seed=0)


def _nouns_of(task, split):
    """The first and second noun of every sentence, read back from the token ids."""
    first = [task.vocab[int(t)] for t in split.tokens.gather(1, split.noun_positions[:, :1])[:, 0]]
    second = [task.vocab[int(t)] for t in split.tokens.gather(1, split.noun_positions[:, 1:])[:, 0]]
    return first, second


def test_shapes_and_padding(task):
    for split, n in ((task.train, 2000), (task.heldout, 500)):
        assert len(split) == n
        assert split.tokens.shape == (n, task.block_size)
        assert split.tokens.dtype == torch.long
        assert split.it_index.shape == split.referent.shape == split.label.shape == (n,)
        assert split.noun_positions.shape == (n, 2)
        lengths = torch.tensor([len(s.split()) for s in split.sentences])
        assert torch.equal(split.padding_mask.sum(1), lengths)
        # padding only at the end of each row
        assert torch.equal(split.padding_mask, torch.arange(task.block_size) < lengths[:, None])
    assert task.block_size == max(len(t.split()) for t in REFERENT_TEMPLATES)
    assert task.vocab[0] == "<pad>" and len(set(task.vocab)) == len(task.vocab)
    assert task.vocab[-len(task.nouns):] == task.nouns                # label i is word id offset + i
    for split in (task.train, task.heldout):
        offset = len(task.vocab) - len(task.nouns)
        rows = torch.arange(len(split))
        referent_ids = split.tokens[rows, split.noun_positions[rows, split.referent]]
        assert torch.equal(referent_ids - offset, split.label)


def test_tokens_spell_the_sentences(task):
    for split in (task.train, task.heldout):
        for i in range(0, len(split), 37):
            assert " ".join(task.decode(split.tokens[i])) == split.sentences[i]
            assert task.encode(split.sentences[i]) == split.tokens[i][split.padding_mask[i]].tolist()


def test_positions_and_labels_are_correct(task):
    for split in (task.train, task.heldout):
        for i, sentence in enumerate(split.sentences):
            words = sentence.split()
            assert words[split.it_index[i]] == "it"
            n1, n2 = (words[p] for p in split.noun_positions[i].tolist())
            assert split.noun_positions[i, 0] < split.noun_positions[i, 1]
            assert {n1 in ANIMALS, n2 in ANIMALS} == {True, False}      # one animal, one object
            adjectives = [w for w in words if w in ANIMAL_ADJECTIVES + OBJECT_ADJECTIVES]
            assert len(adjectives) == 1
            referent = n1 if (n1 in ANIMALS) == (adjectives[0] in ANIMAL_ADJECTIVES) else n2
            assert (n1, n2)[split.referent[i]] == referent
            assert task.nouns[split.label[i]] == referent


def test_heldout_nouns_never_held_their_role_in_training(task):
    train_first, train_second = _nouns_of(task, task.train)
    held_first, held_second = _nouns_of(task, task.heldout)
    assert set(train_first) <= set(task.first_in_train)
    assert set(train_second) <= set(task.second_in_train)
    assert not set(held_first) & set(train_first)                   # the promise of the split
    assert not set(held_second) & set(train_second)
    assert set(task.first_in_train).isdisjoint(task.second_in_train)
    assert sorted(task.first_in_train + task.second_in_train) == sorted(task.nouns)
    # every noun is used in training, so held-out nouns are known words in a new role
    assert set(train_first) | set(train_second) == set(task.nouns)
    assert not set(task.heldout.sentences) & set(task.train.sentences)


def test_the_task_is_balanced(task):
    split = task.train
    assert 0.4 < split.referent.float().mean() < 0.6                  # "it" is the first noun half the time
    first, _ = _nouns_of(task, split)
    assert 0.4 < sum(w in ANIMALS for w in first) / len(first) < 0.6  # both noun orders
    assert len(set(split.noun_positions[:, 0].tolist())) >= 4         # the first noun moves around
    assert len(set(split.it_index.tolist())) >= 4
    for template in REFERENT_TEMPLATES:                              # every sentence shape is used
        prefix = template.split("{")[0]
        assert any(s.startswith(prefix) for s in split.sentences)


def test_deterministic_for_a_seed():
    a = referent_sentences(n_train=300, n_heldout=100, seed=3)
    b = referent_sentences(n_train=300, n_heldout=100, seed=3)
    c = referent_sentences(n_train=300, n_heldout=100, seed=4)
    assert a.train.sentences == b.train.sentences and a.heldout.sentences == b.heldout.sentences
    assert torch.equal(a.train.tokens, b.train.tokens) and torch.equal(a.heldout.label, b.heldout.label)
    assert a.first_in_train == b.first_in_train
    assert a.train.sentences != c.train.sentences


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_animals=st.integers(2, 30), n_objects=st.integers(2, 30))
def test_labels_follow_the_adjective_for_any_seed_and_size(seed, n_animals, n_objects):
    t = referent_sentences(n_train=40, n_heldout=40, seed=seed, n_animals=n_animals, n_objects=n_objects)
    assert t.animals == list(ANIMALS[:n_animals]) and t.objects == list(OBJECTS[:n_objects])
    for split, (first_role, second_role) in ((t.train, (t.first_in_train, t.second_in_train)),
                                             (t.heldout, (t.second_in_train, t.first_in_train))):
        for i, sentence in enumerate(split.sentences):
            words = sentence.split()
            n1, n2 = (words[p] for p in split.noun_positions[i].tolist())
            assert n1 in first_role and n2 in second_role
            adjective = next(w for w in words if w in ANIMAL_ADJECTIVES + OBJECT_ADJECTIVES)
            wanted_animal = adjective in ANIMAL_ADJECTIVES
            assert (t.nouns[split.label[i]] in t.animals) == wanted_animal
            assert t.nouns[split.label[i]] in (n1, n2)


@pytest.mark.parametrize("kwargs", [
    dict(n_train=0), dict(n_heldout=0), dict(n_train=-5),
    dict(n_animals=1), dict(n_animals=31), dict(n_objects=1), dict(n_objects=100),
    dict(n_train=10.0), dict(seed=1.5), dict(seed=True), dict(n_animals="30"),
])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        referent_sentences(**kwargs)


def test_encode_rejects_unknown_words(task):
    with pytest.raises(ValueError, match="vocabulary"):
        task.encode("the unicorn sat on the mat because it was tired")
