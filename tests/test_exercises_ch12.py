"""Chapter 12's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch12 import (check_induction_score, check_parity_scratchpad,
                                        check_previous_token_score,
                                        check_token_and_exact_match)

# -----------------------------------------------------------------------------
# the previous-token score


def prev_right(weights):
    return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).mean(-1)


def test_previous_token_accepts_a_correct_answer(capsys):
    check_previous_token_score(prev_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_previous_token_accepts_a_loop():
    def loop(weights):
        H, T, _ = weights.shape
        return torch.tensor([sum(weights[h, t, t - 1].item() for t in range(1, T)) / (T - 1)
                             for h in range(H)])
    check_previous_token_score(loop)


def test_previous_token_rejects_the_main_diagonal():
    with pytest.raises(CheckFailed, match="own position"):
        check_previous_token_score(lambda w: torch.diagonal(w, dim1=-2, dim2=-1).mean(-1))


def test_previous_token_rejects_averaging_over_all_queries():
    def over_t(weights):
        T = weights.shape[-1]
        return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1).sum(-1) / T
    with pytest.raises(CheckFailed, match="T - 1 queries"):
        check_previous_token_score(over_t)


def test_previous_token_rejects_one_number_for_all_heads():
    with pytest.raises(CheckFailed, match="one score per head"):
        check_previous_token_score(lambda w: prev_right(w).mean())


def test_previous_token_keeps_the_learners_traceback():
    def broken(weights):
        return weights.diagonl(-1)
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_previous_token_score(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# the induction score


def induction_right(weights, span):
    return torch.diagonal(weights, offset=-(span - 1), dim1=-2, dim2=-1)[:, -span:].mean(-1)


def test_induction_accepts_a_correct_answer(capsys):
    check_induction_score(induction_right)
    assert "all 3 checks passed" in capsys.readouterr().out


def test_induction_rejects_the_earlier_occurrence_itself():
    def duplicate(weights, span):
        return torch.diagonal(weights, offset=-span, dim1=-2, dim2=-1).mean(-1)
    with pytest.raises(CheckFailed, match="one further"):
        check_induction_score(duplicate)


def test_induction_rejects_counting_the_first_copy():
    def all_rows(weights, span):
        return torch.diagonal(weights, offset=-(span - 1), dim1=-2, dim2=-1).mean(-1)
    with pytest.raises(CheckFailed, match="second copy"):
        check_induction_score(all_rows)


def test_induction_rejects_the_previous_token_score():
    def prev(weights, span):
        return torch.diagonal(weights, offset=-1, dim1=-2, dim2=-1)[:, -span:].mean(-1)
    with pytest.raises(CheckFailed, match="previous-token"):
        check_induction_score(prev)


def test_induction_keeps_the_learners_traceback():
    def broken(weights, span):
        raise ZeroDivisionError("oops")
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError") as info:
        check_induction_score(broken)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -----------------------------------------------------------------------------
# the parity scratchpad


def scratchpad_right(bits):
    out, p = "", 0
    for b in bits:
        p ^= int(b)
        out += b + str(p)
    return out + "=" + str(p)


def test_scratchpad_accepts_a_correct_answer(capsys):
    check_parity_scratchpad(scratchpad_right)
    assert "all 8 checks passed" in capsys.readouterr().out


def test_scratchpad_rejects_the_direct_answer():
    with pytest.raises(CheckFailed, match="direct answer"):
        check_parity_scratchpad(lambda bits: bits + "=" + str(bits.count("1") % 2))


def test_scratchpad_rejects_a_missing_answer():
    with pytest.raises(CheckFailed, match="end it with"):
        check_parity_scratchpad(lambda bits: scratchpad_right(bits)[:-2])


def test_scratchpad_rejects_flipped_parities():
    def flipped(bits):
        out, p = "", 1
        for b in bits:
            p ^= int(b)
            out += b + str(p)
        return out + "=" + str(1 - p)
    with pytest.raises(CheckFailed, match="flipped"):
        check_parity_scratchpad(flipped)


def test_scratchpad_keeps_the_learners_traceback():
    def broken(bits):
        return "".join(b + p for b, p in zip(bits, [0] * len(bits)))
    with pytest.raises(CheckFailed, match="raised TypeError") as info:
        check_parity_scratchpad(broken)
    assert isinstance(info.value.__cause__, TypeError)


# -----------------------------------------------------------------------------
# per-token accuracy and exact match


def scores_right(predictions, targets):
    scored = targets != -100
    right = (predictions == targets) & scored
    per_token = right.sum() / scored.sum()
    exact = (right == scored).all(dim=1).float().mean()
    return per_token, exact


def test_scores_accept_a_correct_answer(capsys):
    check_token_and_exact_match(scores_right)
    assert "all 2 checks passed" in capsys.readouterr().out


def test_scores_accept_floats_in_a_list():
    check_token_and_exact_match(lambda p, t: [float(v) for v in scores_right(p, t)])


def test_scores_reject_counting_padding():
    def with_pad(predictions, targets):
        per_token = (predictions == targets).float().mean()
        return per_token, scores_right(predictions, targets)[1]
    with pytest.raises(CheckFailed, match="counted the -100"):
        check_token_and_exact_match(with_pad)


def test_scores_reject_a_mean_of_sequence_accuracies():
    def per_sequence(predictions, targets):
        scored = targets != -100
        right = (predictions == targets) & scored
        return (right.sum(1) / scored.sum(1)).mean(), scores_right(predictions, targets)[1]
    with pytest.raises(CheckFailed, match="per-sequence"):
        check_token_and_exact_match(per_sequence)


def test_scores_reject_a_single_number():
    with pytest.raises(CheckFailed, match="a pair"):
        check_token_and_exact_match(lambda p, t: scores_right(p, t)[0])


def test_scores_keep_the_learners_traceback():
    def broken(predictions, targets):
        return predictions.nope
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_token_and_exact_match(broken)
    assert isinstance(info.value.__cause__, AttributeError)
