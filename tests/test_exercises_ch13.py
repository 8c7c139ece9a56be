"""Chapter 13's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch13 import (check_alibi_matrix, check_calibration_error,
                                        check_coverage_at_threshold, check_rope_rotation)

# -----------------------------------------------------------------------------
# expected calibration error


def ece_right(confidence, correct, n_bins):
    which = (confidence * n_bins).long().clamp(max=n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            gap = correct[inside].float().mean() - confidence[inside].mean()
            total += inside.float().mean() * gap.abs()
    return total


def ece_variant(weighted=True, absolute=True, keep_ones=True):
    def fn(confidence, correct, n_bins):
        which = (confidence * n_bins).long()
        if keep_ones:
            which = which.clamp(max=n_bins - 1)
        gaps, shares = [], []
        for b in range(n_bins):
            inside = which == b
            if inside.any():
                gap = correct[inside].float().mean() - confidence[inside].mean()
                gaps.append(gap.abs() if absolute else gap)
                shares.append(inside.float().sum() / len(confidence))
        if weighted:
            return sum(s * g for s, g in zip(shares, gaps))
        return sum(gaps) / len(gaps)
    return fn


def test_ece_accepts_a_correct_answer(capsys):
    check_calibration_error(ece_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_ece_rejects_an_unweighted_mean():
    with pytest.raises(CheckFailed, match="share of the answers"):
        check_calibration_error(ece_variant(weighted=False))


def test_ece_rejects_signed_gaps():
    with pytest.raises(CheckFailed, match=r"\|accuracy - confidence\|"):
        check_calibration_error(ece_variant(absolute=False))


def test_ece_rejects_dropping_confidence_one():
    with pytest.raises(CheckFailed, match="exactly 1.0"):
        check_calibration_error(ece_variant(keep_ones=False))


def test_ece_keeps_the_learners_traceback():
    def broken(confidence, correct, n_bins):
        return confidence.means()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_calibration_error(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# coverage at a threshold


def coverage_right(confidence, correct, threshold):
    answered = confidence >= threshold
    return answered.float().mean().item(), correct[answered].float().mean().item()


def test_coverage_accepts_a_correct_answer(capsys):
    check_coverage_at_threshold(coverage_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_coverage_rejects_a_strict_threshold():
    def strict(confidence, correct, threshold):
        answered = confidence > threshold
        return answered.float().mean(), correct[answered].float().mean()
    with pytest.raises(CheckFailed, match=">=, not >"):
        check_coverage_at_threshold(strict)


def test_coverage_rejects_accuracy_over_every_question():
    def over_all(confidence, correct, threshold):
        answered = confidence >= threshold
        return answered.float().mean(), (correct & answered).float().mean()
    with pytest.raises(CheckFailed, match="answers given"):
        check_coverage_at_threshold(over_all)


def test_coverage_rejects_a_single_number():
    with pytest.raises(CheckFailed, match="pair"):
        check_coverage_at_threshold(lambda c, k, t: (c >= t).float().mean())


# -----------------------------------------------------------------------------
# ALiBi


def alibi_right(n_heads, T):
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1) / n_heads)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return -slopes[:, None, None] * distance


def test_alibi_accepts_a_correct_answer(capsys):
    check_alibi_matrix(alibi_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_alibi_rejects_a_flipped_sign():
    with pytest.raises(CheckFailed, match="sign is flipped"):
        check_alibi_matrix(lambda h, T: -alibi_right(h, T))


def test_alibi_rejects_reversed_slopes():
    with pytest.raises(CheckFailed, match="reverse order"):
        check_alibi_matrix(lambda h, T: alibi_right(h, T).flip(0))


def test_alibi_rejects_slopes_off_by_one():
    def off(n_heads, T):
        slopes = 2.0 ** (-8.0 * torch.arange(n_heads) / n_heads)
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        return -slopes[:, None, None] * distance
    with pytest.raises(CheckFailed, match="off by one"):
        check_alibi_matrix(off)


def test_alibi_rejects_absolute_distance():
    with pytest.raises(CheckFailed, match=r"\|i - j\|"):
        check_alibi_matrix(lambda h, T: -alibi_right(h, T).abs())


def test_alibi_keeps_the_learners_traceback():
    def broken(n_heads, T):
        raise RuntimeError("shape mismatch")
    with pytest.raises(CheckFailed, match="raised RuntimeError") as info:
        check_alibi_matrix(broken)
    assert isinstance(info.value.__cause__, RuntimeError)


# -----------------------------------------------------------------------------
# RoPE


def rope_right(x, positions, base):
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    a, b = x[:, :d // 2].double(), x[:, d // 2:].double()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def test_rope_accepts_a_correct_answer(capsys):
    check_rope_rotation(rope_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_rope_accepts_transformers_layout_in_float32():
    def hf_style(x, positions, base):
        d = x.shape[-1]
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
        emb = torch.tensor(positions).float()[:, None] * inv_freq
        emb = torch.cat([emb, emb], dim=-1)
        rot = torch.cat([-x[:, d // 2:], x[:, :d // 2]], dim=-1)
        return x * emb.cos() + rot * emb.sin()
    check_rope_rotation(hf_style)


def test_rope_rejects_the_interleaved_layout():
    def interleaved(x, positions, base):
        d = x.shape[-1]
        perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
        inverse = torch.argsort(perm)
        return rope_right(x[:, perm], positions, base)[:, inverse]
    with pytest.raises(CheckFailed, match="neighbours"):
        check_rope_rotation(interleaved)


def test_rope_rejects_the_wrong_direction():
    with pytest.raises(CheckFailed, match="wrong way"):
        check_rope_rotation(lambda x, p, base: rope_right(x, [-q for q in p], base))


def test_rope_rejects_wrong_frequencies():
    def wrong(x, positions, base):
        return rope_right(x, positions, base ** 0.5)
    with pytest.raises(CheckFailed, match="frequencies"):
        check_rope_rotation(wrong)


def test_rope_keeps_the_learners_traceback():
    def broken(x, positions, base):
        return x.rotate()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_rope_rotation(broken)
    assert isinstance(info.value.__cause__, AttributeError)
