"""lessons_lib.data: the Shakespeare corpus, the split, the batches."""

import pytest
import torch

from lessons_lib.data import get_batch, load_shakespeare, play_to_text, train_val_split


def test_shakespeare_looks_like_the_classic_text():
    text = load_shakespeare()
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n")
    assert 1_000_000 < len(text) < 1_200_000
    assert len(set(text)) == 64
    assert "*" not in text and "_" not in text and "#" not in text, "markdown left in the text"
    assert "\n\n\n" not in text


def test_play_to_text_drops_stage_directions_and_joins_interrupted_speech():
    markdown = ("# A Play\n\n## ACT I\n\n_Enter ROMEO_\n\n**Romeo**  \nBut soft!  \n_\\[Aside]_  \n"
                "What light?\n\n_Exit_\n\nThrough yonder window.\n\n**Juliet**  \nAy me.\n")
    assert play_to_text(markdown) == "Romeo:\nBut soft!\nWhat light?\nThrough yonder window.\n\nJuliet:\nAy me.\n\n"


def test_train_val_split_keeps_the_last_tenth():
    text = "abcdefghij" * 10
    train, val = train_val_split(text)
    assert train + val == text and len(val) == 10
    ids = torch.arange(1000)
    train, val = train_val_split(ids, 0.25)
    assert len(train) == 750 and val[0].item() == 750
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(text, bad)
    with pytest.raises(ValueError, match="at least 2"):
        train_val_split("a")


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = torch.arange(100)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, 8, 16, generator=g)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = get_batch(data, 8, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2), "same seed, same batch"
    # with exactly block_size + 1 tokens there is one window, and it is the whole text
    x, y = get_batch(torch.arange(17), 3, 16)
    assert torch.equal(x, torch.arange(16).expand(3, 16)) and torch.equal(y, torch.arange(1, 17).expand(3, 16))


def test_get_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D tensor"):
        get_batch(torch.zeros(4, 4, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="1-D tensor"):
        get_batch([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="integer token ids"):
        get_batch(torch.zeros(10), 2, 2)
    with pytest.raises(ValueError, match="needs at least 9"):
        get_batch(torch.arange(8), 2, 8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        get_batch(torch.arange(8), 0, 2)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        get_batch(torch.arange(8), 2, 0)


# -----------------------------------------------------------------------------
# human ratings

from lessons_lib.data import RatedSnippet, load_movie_ratings, preference_pairs, split_ratings  # noqa: E402


def test_movie_ratings_are_the_published_file():
    snippets = load_movie_ratings()
    assert len(snippets) == 10_605
    assert [s.id for s in snippets] == list(range(1, 10_606))
    assert all(-4 <= s.score <= 4 and s.text for s in snippets)
    first = snippets[0]
    assert first.text.startswith("The Rock is destined to be the 21st Century's new")
    assert abs(first.score - 2.26666666667) < 1e-9
    assert abs(snippets[2].score - -0.6) < 1e-9 and snippets[2].text == "Effective but too tepid biopic"
    mean = sum(s.score for s in snippets) / len(snippets)
    assert -1 < mean < 1


def test_split_ratings_is_fixed_disjoint_and_complete():
    snippets = load_movie_ratings()
    train, val = split_ratings(snippets)
    assert abs(len(val) - 0.1 * len(snippets)) <= 1 and len(train) + len(val) == len(snippets)
    assert not {s.id for s in train} & {s.id for s in val}
    again_train, again_val = split_ratings(snippets)
    assert [s.id for s in again_val] == [s.id for s in val]
    assert [s.id for s in split_ratings(snippets, seed=1)[1]] != [s.id for s in val]


def _toy(scores):
    return [RatedSnippet(i, float(score), f"snippet {i}") for i, score in enumerate(scores)]


def test_preference_pairs_respect_the_margin_and_order():
    snippets = _toy([-3, -2, -1, -0.5, 0, 0.2, 1, 2, 3, 3.5] * 5)
    pairs = preference_pairs(snippets, margin=1.0, n_pairs=40, seed=3)
    assert len(pairs) == 40
    assert all(chosen.score - rejected.score >= 1.0 for chosen, rejected in pairs)
    assert all(chosen is not rejected for chosen, rejected in pairs)
    assert preference_pairs(snippets, 1.0, 40, seed=3) == pairs        # reproducible
    one_pass = preference_pairs(snippets, margin=0.0)
    assert len(one_pass) == len(snippets) // 2                           # every snippet used once


def test_preference_pairs_on_real_held_out_snippets_stay_held_out():
    train, val = split_ratings(load_movie_ratings())
    held_out = {s.id for s in val}
    pairs = preference_pairs(val, margin=1.0, n_pairs=500)
    assert all(c.id in held_out and r.id in held_out for c, r in pairs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(snippets=_toy([1.0])), "at least 2"),
    (dict(snippets=_toy([0, 1]), margin=-1), "margin"),
    (dict(snippets=_toy([0, 1]), margin=float("nan")), "margin"),
    (dict(snippets=_toy([0, 1]), margin=5), "span"),
    (dict(snippets=_toy([0, 1]), n_pairs=-1), "n_pairs"),
    (dict(snippets=_toy([0, 0.5, 1.0, 1.2]), margin=1.0, n_pairs=10**6), "fewer"),
])
def test_preference_pairs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_pairs(**kwargs)


def test_read_inner_text_names_a_missing_file():
    from lessons_lib import assets
    from lessons_lib.data import RATINGS_MEMBER
    with pytest.raises(ValueError, match="has no file"):
        assets.read_inner_text("vader", RATINGS_MEMBER, "hutto_ICWSM_2014/nothing.txt")
