"""lessons_lib.scoring: the log-probability of given tokens, against log_softmax by hand."""

import pytest
import torch

from lessons_lib.model import GPT, GPTConfig
from lessons_lib.scoring import (check_response_mask, encode_responses, logprobs_from_logits,
                                 response_logprobs, sequence_logprobs, token_logprobs)

TINY = GPTConfig(vocab_size=13, block_size=24, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(TINY)


def test_token_logprobs_read_any_tokens_of_each_distribution():
    logits = torch.randn(2, 3, 13, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[[0, 5], [12, 12], [3, 1]], [[7, 2], [0, 0], [11, 4]]])
    got = token_logprobs(logits, tokens, temperature=0.5)
    assert got.shape == (2, 3, 2) and got.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            logp = torch.log_softmax(logits[b, t] / 0.5, dim=-1)
            assert got[b, t].tolist() == pytest.approx(logp[tokens[b, t]].tolist(), abs=1e-6)
    half = token_logprobs(logits.bfloat16(), tokens)                     # computed in float32
    assert half.dtype == torch.float32


def test_logprobs_from_logits_align_each_token_with_the_logits_before_it():
    logits = torch.randn(1, 4, 13, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[3, 1, 4, 1]])
    got = logprobs_from_logits(logits, idx)
    want = [0.0] + [torch.log_softmax(logits[0, t - 1], -1)[idx[0, t]].item() for t in (1, 2, 3)]
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)


def test_response_logprobs_sum_the_masked_tokens_in_any_batch_size():
    model = tiny_gpt().train()
    idx, mask = encode_responses([[1, 2], [3], [4, 5, 6]], [[7, 8], [9], [10, 11, 12]], pad_id=0)
    with torch.no_grad():
        want = sequence_logprobs(model.eval(), idx, mask).sum(1)
    model.train()
    for batch_size in (1, 2, 256):
        got = response_logprobs(model, idx, mask, batch_size)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert not got.requires_grad
    assert model.training                                     # its mode is given back


def test_encode_responses_pads_and_masks_the_response_only():
    idx, mask = encode_responses([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=9)
    assert idx.tolist() == [[1, 2, 4, 9], [3, 5, 6, 7]]
    assert mask.tolist() == [[False, False, True, False], [False, True, True, True]]
    with pytest.raises(ValueError, match="empty prompt or response"):
        encode_responses([[1]], [[]], pad_id=0)
    with pytest.raises(ValueError, match="one response per prompt"):
        encode_responses([[1], [2]], [[3]], pad_id=0)


def test_a_response_mask_needs_bools_of_the_shape_and_a_token_per_row():
    mask = torch.tensor([[False, True], [False, True]])
    assert check_response_mask(mask, (2, 2)) is mask
    with pytest.raises(ValueError, match=r"dtype torch.bool \(True on a response's tokens\)"):
        check_response_mask(mask.long(), (2, 2))
    with pytest.raises(ValueError, match=r"must have the shape \(2, 3\), got \(2, 2\)"):
        check_response_mask(mask, (2, 3))
    with pytest.raises(ValueError, match=r"at \[0\]: empty responses"):
        check_response_mask(torch.tensor([[False, False], [False, True]]), (2, 2))
