"""Chapter 9's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch09 import (check_lora_forward, check_lora_parameter_count,
                                        check_masked_loss, check_training_example)

# -----------------------------------------------------------------------------
# one training example


def example_right(prompt_ids, response_ids, prompt_id, response_id, end_id):
    sequence = torch.tensor([prompt_id, *prompt_ids, response_id, *response_ids, end_id])
    inputs, targets = sequence[:-1], sequence[1:].clone()
    targets[:len(prompt_ids) + 1] = -100
    return inputs, targets


def test_example_accepts_tensors_and_lists(capsys):
    check_training_example(example_right)
    assert "all 3 checks passed" in capsys.readouterr().out

    def as_lists(*args):
        inputs, targets = example_right(*args)
        return inputs.tolist(), targets.tolist()
    check_training_example(as_lists)


def test_example_rejects_an_unmasked_response_marker():
    def keeps_marker(prompt_ids, response_ids, *specials):
        inputs, targets = example_right(prompt_ids, response_ids, *specials)
        targets[len(prompt_ids)] = specials[1]
        return inputs, targets
    with pytest.raises(CheckFailed, match="mask it too"):
        check_training_example(keeps_marker)


def test_example_rejects_a_masked_first_response_token():
    def masks_one_more(prompt_ids, response_ids, *specials):
        inputs, targets = example_right(prompt_ids, response_ids, *specials)
        targets[len(prompt_ids) + 1] = -100
        return inputs, targets
    with pytest.raises(CheckFailed, match="first response token is masked"):
        check_training_example(masks_one_more)


def test_example_rejects_no_shift():
    def unshifted(prompt_ids, response_ids, prompt_id, response_id, end_id):
        sequence = torch.tensor([prompt_id, *prompt_ids, response_id, *response_ids, end_id])
        targets = sequence.clone()
        targets[:len(prompt_ids) + 2] = -100
        return sequence, targets
    with pytest.raises(CheckFailed, match="shifted by one"):
        check_training_example(unshifted)


def test_example_keeps_the_learners_traceback():
    def broken(*args):
        raise KeyError("oops")
    with pytest.raises(CheckFailed) as info:
        check_training_example(broken)
    assert isinstance(info.value.__cause__, KeyError)


# -----------------------------------------------------------------------------
# the masked loss


def loss_right(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


def test_masked_loss_accepts_a_correct_answer(capsys):
    check_masked_loss(loss_right)
    assert "all 3 checks passed" in capsys.readouterr().out


def test_masked_loss_rejects_a_mean_over_every_position():
    def over_all(logits, targets):
        per = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")
        return per.mean()
    with pytest.raises(CheckFailed, match="divides by every position"):
        check_masked_loss(over_all)


def test_masked_loss_rejects_a_mean_of_row_means():
    def row_means(logits, targets):
        per = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")
        return (per.sum(1) / (targets != -100).sum(1)).mean()
    with pytest.raises(CheckFailed, match="mean of each row's mean"):
        check_masked_loss(row_means)


def test_masked_loss_rejects_per_token_losses():
    def per_token(logits, targets):
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                               reduction="none")
    with pytest.raises(CheckFailed, match="forget to average"):
        check_masked_loss(per_token)


def test_masked_loss_keeps_the_learners_traceback():
    def unmasked(logits, targets):       # -100 is not a valid class: cross_entropy raises
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=0)
    with pytest.raises(CheckFailed, match="raised") as info:
        check_masked_loss(unmasked)
    assert info.value.__cause__ is not None


# -----------------------------------------------------------------------------
# the LoRA forward pass


def lora_right(x, weight, bias, A, B, alpha):
    return x @ weight.T + bias + (alpha / A.shape[0]) * (x @ A.T) @ B.T


def test_lora_forward_accepts_a_correct_answer(capsys):
    check_lora_forward(lora_right)
    assert "all 3 checks passed" in capsys.readouterr().out

    def merged(x, weight, bias, A, B, alpha):
        return F.linear(x, weight + (alpha / A.shape[0]) * B @ A, bias)
    check_lora_forward(merged)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, w, b, A, B, alpha: x @ w.T + b + alpha * (x @ A.T) @ B.T, "alpha / r"),
    (lambda x, w, b, A, B, alpha: x @ w.T + b + (x @ A.T) @ B.T, "not scaled"),
    (lambda x, w, b, A, B, alpha: x @ w.T + b, "frozen layer alone"),
    (lambda x, w, b, A, B, alpha: x @ w.T + (alpha / A.shape[0]) * (x @ A.T) @ B.T,
     "bias is missing"),
])
def test_lora_forward_names_the_slip(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_lora_forward(wrong)


def test_lora_forward_keeps_the_learners_traceback():
    def transposed(x, weight, bias, A, B, alpha):       # A @ x: a shape error
        return x @ weight.T + bias + (alpha / A.shape[0]) * (x @ B) @ A
    with pytest.raises(CheckFailed, match="raised") as info:
        check_lora_forward(transposed)
    assert isinstance(info.value.__cause__, RuntimeError)


# -----------------------------------------------------------------------------
# LoRA's parameter count


LINEARS = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1), "mlp.c_proj": (1, 4)}


def count_right(n_layer, n_embd, r, targets):
    total = 0
    for name, (out_mult, in_mult) in LINEARS.items():
        if any(name == t or name.endswith("." + t) for t in targets):
            total += r * (out_mult + in_mult) * n_embd
    return n_layer * total


def test_count_accepts_a_correct_answer(capsys):
    check_lora_parameter_count(count_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_count_rejects_one_c_proj():
    def one_c_proj(n_layer, n_embd, r, targets):
        targets = [t if t != "c_proj" else "attn.c_proj" for t in targets]
        return count_right(n_layer, n_embd, r, targets)
    with pytest.raises(CheckFailed, match="names two layers"):
        check_lora_parameter_count(one_c_proj)


def test_count_rejects_one_block_and_full_matrices():
    with pytest.raises(CheckFailed, match="one block"):
        check_lora_parameter_count(lambda L, d, r, t: count_right(1, d, r, t) if L > 1
                                   else count_right(L, d, r, t) + 1)
    with pytest.raises(CheckFailed, match="full weight"):
        check_lora_parameter_count(
            lambda L, d, r, t: L * sum(o * i * d * d for n, (o, i) in LINEARS.items()
                                       if any(n == x or n.endswith("." + x) for x in t)))
