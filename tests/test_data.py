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
