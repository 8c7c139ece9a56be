"""Chapter 10's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch10 import (check_bradley_terry, check_clipped_objective,
                                        check_gae_loop, check_penalized_rewards)

# -----------------------------------------------------------------------------
# the Bradley-Terry loss


def bt_right(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def test_bradley_terry_accepts_a_correct_answer(capsys):
    check_bradley_terry(bt_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_bradley_terry_accepts_softplus_and_a_float():
    check_bradley_terry(lambda c, r: F.softplus(r - c).mean().item())


def test_bradley_terry_rejects_swapped_pairs():
    with pytest.raises(CheckFailed, match="swapped"):
        check_bradley_terry(lambda c, r: bt_right(r, c))


def test_bradley_terry_rejects_a_sum():
    with pytest.raises(CheckFailed, match="take the mean"):
        check_bradley_terry(lambda c, r: -F.logsigmoid(c - r).sum())


def test_bradley_terry_rejects_log_of_sigmoid_that_underflows():
    with pytest.raises(CheckFailed, match="margin of 120"):
        check_bradley_terry(lambda c, r: -torch.log(torch.sigmoid(c - r)).mean())


def test_bradley_terry_rejects_a_loss_without_the_log():
    with pytest.raises(CheckFailed, match="takes the log"):
        check_bradley_terry(lambda c, r: (1 - torch.sigmoid(c - r)).mean())


def test_bradley_terry_keeps_the_learners_traceback():
    def broken(c, r):
        return F.logsigmoid(c - r).means()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_bradley_terry(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# per-token rewards with the KL penalty


def penalized_right(score, logp, ref_logp, kl_coef):
    rewards = -kl_coef * (logp - ref_logp)
    rewards[-1] += score
    return rewards


def test_penalized_accepts_a_correct_answer(capsys):
    check_penalized_rewards(penalized_right)
    assert "all 4 checks passed" in capsys.readouterr().out


def test_penalized_leaves_the_inputs_alone_when_checking():
    logp = torch.tensor([-1.0, -2.0])
    check_penalized_rewards(penalized_right)
    assert logp.tolist() == [-1.0, -2.0]


def test_penalized_rejects_the_score_on_every_token():
    with pytest.raises(CheckFailed, match="on every token"):
        check_penalized_rewards(lambda s, lp, rl, c: -c * (lp - rl) + s)


def test_penalized_rejects_a_flipped_penalty():
    def flipped(score, logp, ref_logp, kl_coef):
        rewards = kl_coef * (logp - ref_logp)
        rewards[-1] += score
        return rewards
    with pytest.raises(CheckFailed, match="wrong sign"):
        check_penalized_rewards(flipped)


def test_penalized_rejects_the_score_on_the_first_token():
    def first(score, logp, ref_logp, kl_coef):
        rewards = -kl_coef * (logp - ref_logp)
        rewards[0] += score
        return rewards
    with pytest.raises(CheckFailed, match="first token"):
        check_penalized_rewards(first)


def test_penalized_rejects_a_missing_score():
    with pytest.raises(CheckFailed, match="score is missing"):
        check_penalized_rewards(lambda s, lp, rl, c: -c * (lp - rl))


# -----------------------------------------------------------------------------
# GAE by a backward loop


def gae_right(rewards, values, gamma, lam):
    T = len(rewards)
    advantages = torch.zeros(T, dtype=torch.float64)
    running = 0.0
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_accepts_a_correct_answer(capsys):
    check_gae_loop(gae_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_gae_accepts_float32():
    check_gae_loop(lambda r, v, g, l: gae_right(r, v, g, l).float())


def test_gae_rejects_a_forward_loop():
    def forward(rewards, values, gamma, lam):
        T = len(rewards)
        out, running = torch.zeros(T), 0.0
        for t in range(T):
            next_value = values[t + 1] if t + 1 < T else 0.0
            running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
            out[t] = running
        return out
    with pytest.raises(CheckFailed, match="ran forwards"):
        check_gae_loop(forward)


def test_gae_rejects_the_one_step_errors():
    def deltas(rewards, values, gamma, lam):
        next_values = torch.cat([values[1:], torch.zeros(1)])
        return rewards + gamma * next_values - values
    with pytest.raises(CheckFailed, match="one-step errors"):
        check_gae_loop(deltas)


def test_gae_rejects_a_missing_lambda():
    with pytest.raises(CheckFailed, match="lam is missing"):
        check_gae_loop(lambda r, v, g, l: gae_right(r, v, g, 1.0))


def test_gae_rejects_returns_plus_values():
    with pytest.raises(CheckFailed, match="returns A \\+ V"):
        check_gae_loop(lambda r, v, g, l: gae_right(r, v, g, l) + v.double())


def test_gae_rejects_a_wrong_shape():
    with pytest.raises(CheckFailed, match="shape"):
        check_gae_loop(lambda r, v, g, l: gae_right(r, v, g, l)[None])


# -----------------------------------------------------------------------------
# the clipped objective


def clipped_right(new_logp, old_logp, advantages, clip):
    ratio = torch.exp(new_logp - old_logp)
    clipped = ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean()


def test_clipped_accepts_a_correct_answer(capsys):
    check_clipped_objective(clipped_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_clipped_accepts_the_min_of_the_objective_negated():
    def via_min(new_logp, old_logp, advantages, clip):
        ratio = torch.exp(new_logp - old_logp)
        return -torch.minimum(advantages * ratio,
                              advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    check_clipped_objective(via_min)


def test_clipped_rejects_the_optimistic_loss():
    def optimistic(new_logp, old_logp, advantages, clip):
        ratio = torch.exp(new_logp - old_logp)
        return torch.minimum(-advantages * ratio,
                             -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    with pytest.raises(CheckFailed, match="optimistic"):
        check_clipped_objective(optimistic)


def test_clipped_rejects_no_clipping():
    with pytest.raises(CheckFailed, match="not clipped"):
        check_clipped_objective(lambda n, o, a, c: (-a * torch.exp(n - o)).mean())


def test_clipped_rejects_the_objective_instead_of_the_loss():
    with pytest.raises(CheckFailed, match="to maximise"):
        check_clipped_objective(lambda n, o, a, c: -clipped_right(n, o, a, c))


def test_clipped_keeps_the_learners_traceback():
    def raising(n, o, a, c):
        raise ZeroDivisionError("oops")
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError") as info:
        check_clipped_objective(raising)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -----------------------------------------------------------------------------
# two independent codes checked against each other: the checkers' cases on lessons_lib.rlhf


def test_the_library_passes_the_chapters_checkers(capsys):
    from lessons_lib import rlhf

    def penalized(score, logp, ref_logp, kl_coef):
        mask = torch.ones(1, len(logp), dtype=torch.bool)
        rewards, _ = rlhf.kl_penalized_rewards(torch.tensor([float(score)]), logp[None],
                                               ref_logp[None], mask, kl_coef)
        return rewards[0]

    def gae_loop(rewards, values, gamma, lam):
        mask = torch.ones(1, len(rewards), dtype=torch.bool)
        return rlhf.gae(rewards[None], values[None], mask, gamma, lam)[0][0]

    def clipped(new_logp, old_logp, advantages, clip):
        mask = torch.ones(1, len(new_logp), dtype=torch.bool)
        zeros = torch.zeros(1, len(new_logp))
        return rlhf.ppo_losses(new_logp[None], old_logp[None], advantages[None], zeros, zeros,
                               zeros, mask, clip=clip).policy

    check_bradley_terry(rlhf.bradley_terry_loss)
    check_penalized_rewards(penalized)
    check_gae_loop(gae_loop)
    check_clipped_objective(clipped)
    assert capsys.readouterr().out.count("checks passed") == 4
