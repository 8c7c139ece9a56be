"""Chapter 7's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch07 import (check_attend_one_step, check_lr_schedule, check_top_k_filter,
                                        check_whole_split_loss)

# -----------------------------------------------------------------------------
# the learning-rate schedule


def lr_right(step, max_steps, warmup_steps, lr, min_lr_ratio):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_lr_accepts_warmup_then_cosine(capsys):
    check_lr_schedule(lr_right)
    assert "all 10 checks passed" in capsys.readouterr().out


def test_lr_rejects_a_warmup_that_starts_at_zero():
    def from_zero(step, max_steps, warmup_steps, lr, ratio):
        if step < warmup_steps:
            return lr * step / warmup_steps
        return lr_right(step, max_steps, warmup_steps, lr, ratio)
    with pytest.raises(CheckFailed, match=r"step \+ 1"):
        check_lr_schedule(from_zero)


def test_lr_rejects_a_cosine_to_zero():
    def to_zero(step, max_steps, warmup_steps, lr, ratio):
        return lr_right(step, max_steps, warmup_steps, lr, 0.0)
    with pytest.raises(CheckFailed, match="min_lr_ratio"):
        check_lr_schedule(to_zero)


# -----------------------------------------------------------------------------
# top-k


def top_k_right(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def test_top_k_accepts_a_correct_filter(capsys):
    check_top_k_filter(top_k_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_top_k_accepts_a_scatter_version():
    def scatter(logits, k):
        values, index = torch.topk(logits, k, dim=-1)
        return torch.full_like(logits, float("-inf")).scatter(-1, index, values)
    check_top_k_filter(scatter)


def test_top_k_rejects_an_off_by_one():
    with pytest.raises(CheckFailed, match="off-by-one"):
        check_top_k_filter(lambda logits, k: top_k_right(logits, k + 1) if k + 1 <= logits.shape[-1]
                           else top_k_right(logits, k - 1))


def test_top_k_rejects_zeros_instead_of_minus_infinity():
    def zeros(logits, k):
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, 0.0)
    with pytest.raises(CheckFailed, match="-inf"):
        check_top_k_filter(zeros)


def test_top_k_rejects_probabilities_and_the_wrong_dimension():
    with pytest.raises(CheckFailed, match="values changed"):
        check_top_k_filter(lambda logits, k: top_k_right(logits, k).softmax(-1).log() + 1)

    def whole_tensor(logits, k):
        kth = logits.flatten().topk(k * logits.shape[0]).values[-1]
        return logits.masked_fill(logits < kth, float("-inf"))
    with pytest.raises(CheckFailed, match="top_k_filter: not yet"):
        check_top_k_filter(whole_tensor)


# -----------------------------------------------------------------------------
# one step of the KV cache


def attend_right(q, k_new, v_new, k_cache, v_cache):
    k_cache = torch.cat([k_cache, k_new], dim=2)
    v_cache = torch.cat([v_cache, v_new], dim=2)
    scores = q @ k_cache.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v_cache, k_cache, v_cache


def test_attend_accepts_append_then_attend(capsys):
    check_attend_one_step(attend_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_attend_accepts_pytorchs_attention():
    def fused(q, k_new, v_new, k_cache, v_cache):
        k, v = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
        return F.scaled_dot_product_attention(q, k, v), k, v
    check_attend_one_step(fused)


def test_attend_rejects_attending_before_appending():
    def too_early(q, k_new, v_new, k_cache, v_cache):
        out = F.scaled_dot_product_attention(q, k_cache, v_cache)
        return out, torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    with pytest.raises(CheckFailed, match="attend to itself"):
        check_attend_one_step(too_early)


def test_attend_rejects_a_cache_that_does_not_grow_and_a_missing_scale():
    with pytest.raises(CheckFailed, match="grow by one position"):
        check_attend_one_step(lambda q, k, v, kc, vc: (attend_right(q, k, v, kc, vc)[0], kc, vc))

    def unscaled(q, k_new, v_new, k_cache, v_cache):
        k, v = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v, k, v
    with pytest.raises(CheckFailed, match="sqrt"):
        check_attend_one_step(unscaled)


# -----------------------------------------------------------------------------
# the whole-split score


def whole_split_right(model, ids, block_size):
    inputs, targets = ids[:-1], ids[1:]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), block_size):
            x = inputs[start:start + block_size][None]
            y = targets[start:start + block_size][None]
            logits, _ = model(x)
            total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
    return total / len(inputs)


@pytest.mark.slow
def test_whole_split_accepts_the_window_loop(capsys):
    check_whole_split_loss(whole_split_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_whole_split_rejects_dropping_the_short_last_window():
    def drop_last(model, ids, block_size):
        n = (len(ids) - 1) // block_size * block_size
        return whole_split_right(model, ids[: n + 1], block_size) if n else whole_split_right(model, ids, block_size)
    with pytest.raises(CheckFailed, match="missing"):
        check_whole_split_loss(drop_last)


def test_whole_split_rejects_a_mean_of_window_means():
    def mean_of_means(model, ids, block_size):
        inputs, targets = ids[:-1], ids[1:]
        means = []
        with torch.no_grad():
            for start in range(0, len(inputs), block_size):
                _, loss = model(inputs[start:start + block_size][None], targets[start:start + block_size][None])
                means.append(loss.item())
        return sum(means) / len(means)
    with pytest.raises(CheckFailed, match="expected"):
        check_whole_split_loss(mean_of_means)


def test_whole_split_rejects_a_tensor_of_losses():
    with pytest.raises(CheckFailed, match="one number"):
        check_whole_split_loss(lambda model, ids, bs: torch.zeros(3))


# -----------------------------------------------------------------------------
# the checkers' own references agree with the library functions the chapter uses,
# and a failing random case says how to rebuild it


def test_references_agree_with_the_library():
    from lessons_lib.exercises.ch07 import (_loss_model, _lr_reference, _top_k_reference,
                                            _window_loss_reference)
    from lessons_lib.generate import filter_logits
    from lessons_lib.pretrained import evaluate_split
    from lessons_lib.train import TrainConfig, lr_at

    for step in (0, 5, 9, 10, 50, 99, 100, 150):
        cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
        assert math.isclose(lr_at(step, cfg), _lr_reference(step, 100, 10, 1e-3, 0.1), rel_tol=1e-9)
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_logits(logits, top_k=4), _top_k_reference(logits, 4))
    model = _loss_model()
    ids = torch.randint(13, (50,), generator=torch.Generator().manual_seed(1))
    assert math.isclose(evaluate_split(model, ids, 16), _window_loss_reference(model, ids, 16), rel_tol=1e-5)


def test_failing_random_cases_carry_a_rebuild_line():
    from lessons_lib.exercises.ch07 import attend_case, loss_case
    with pytest.raises(CheckFailed, match=r"To rerun this case: logits, k = 3 \* torch.randn\(1, 5"):
        check_top_k_filter(lambda logits, k: logits)
    with pytest.raises(CheckFailed, match=r"attend_case\(1, 1, 3, 4, seed=800\)"):
        check_attend_one_step(lambda q, k, v, kc, vc: (q, kc, vc))
    with pytest.raises(CheckFailed, match=r"loss_case\(0\)") as info:
        check_whole_split_loss(lambda model, ids, bs: 0.0)
    assert "model, ids, block_size = loss_case(0)" in str(info.value)
    args, (out, k, v) = attend_case(1, 1, 3, 4, seed=800)
    assert torch.allclose(attend_right(*args)[0], out, atol=1e-6)
    model, ids, block_size = loss_case(2)
    assert block_size == 7 and len(ids) == 40
    assert math.isclose(whole_split_right(model, ids, block_size),
                        whole_split_right(*loss_case(2)), rel_tol=1e-6)


def test_a_raising_function_keeps_its_traceback():
    def crash(*args):
        raise RuntimeError("boom")
    for check in (check_lr_schedule, check_top_k_filter, check_attend_one_step, check_whole_split_loss):
        with pytest.raises(CheckFailed, match="raised RuntimeError: boom") as info:
            check(crash)
        assert isinstance(info.value.__cause__, RuntimeError)
