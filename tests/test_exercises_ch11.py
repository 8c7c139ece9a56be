"""Chapter 11's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch11 import (check_dpo_loss, check_group_advantages,
                                        check_grpo_objective, check_kl_estimators,
                                        check_pass_at_k)

# -----------------------------------------------------------------------------
# the DPO loss


def dpo_right(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margins).mean()


def test_dpo_accepts_a_correct_answer(capsys):
    check_dpo_loss(dpo_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_dpo_accepts_softplus_and_a_float():
    def via_softplus(pc, pr, rc, rr, beta):
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        return F.softplus(-beta * (chosen_ratio - rejected_ratio)).mean().item()
    check_dpo_loss(via_softplus)


def test_dpo_accepts_the_policy_margin_minus_the_reference_margin():
    check_dpo_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - pr) - (rc - rr))).mean())


def test_dpo_rejects_swapped_pairs():
    with pytest.raises(CheckFailed, match="chosen and rejected swapped"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: dpo_right(pr, pc, rr, rc, b))


def test_dpo_rejects_ratios_taken_the_wrong_way():
    with pytest.raises(CheckFailed, match="ref - policy"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((rc - pc) - (rr - pr))).mean())


def test_dpo_rejects_a_missing_beta():
    with pytest.raises(CheckFailed, match="beta is missing"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: dpo_right(pc, pr, rc, rr, 1.0))


def test_dpo_rejects_a_missing_reference():
    with pytest.raises(CheckFailed, match="reference is missing"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * (pc - pr)).mean())


def test_dpo_rejects_a_sum():
    with pytest.raises(CheckFailed, match="take the mean"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - rc) - (pr - rr))).sum())


def test_dpo_rejects_log_of_sigmoid_that_underflows():
    def underflow(pc, pr, rc, rr, beta):
        return -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))).mean()
    with pytest.raises(CheckFailed, match="(?s)Check 4 of 6.*underflowed") as info:
        check_dpo_loss(underflow)
    assert "logsigmoid" in str(info.value)


def test_dpo_rejects_a_loss_per_pair():
    with pytest.raises(CheckFailed, match="Did you forget to average"):
        check_dpo_loss(lambda pc, pr, rc, rr, b: -F.logsigmoid(b * ((pc - rc) - (pr - rr))))


def test_dpo_keeps_the_learners_traceback():
    def broken(pc, pr, rc, rr, beta):
        return F.logsigmoid(beta * (pc - rc - pr + rr)).means()
    with pytest.raises(CheckFailed, match="raised AttributeError") as info:
        check_dpo_loss(broken)
    assert isinstance(info.value.__cause__, AttributeError)


# -----------------------------------------------------------------------------
# group-relative advantages


def advantages_right(rewards, group_size):
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + 1e-4)).view(-1)


def test_advantages_accept_a_correct_answer(capsys):
    check_group_advantages(advantages_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_advantages_accept_a_loop_over_groups_in_float64():
    def loop(rewards, group_size):
        out = torch.empty(len(rewards), dtype=torch.float64)
        for start in range(0, len(rewards), group_size):
            group = rewards[start:start + group_size].double()
            out[start:start + group_size] = (group - group.mean()) / (group.std() + 1e-4)
        return out
    check_group_advantages(loop)


def test_advantages_name_the_rebuild_line_of_a_random_case():
    def small_only(rewards, group_size):
        return advantages_right(rewards, group_size) * (1 if len(rewards) <= 12 else 2)
    with pytest.raises(CheckFailed, match="Check 5 of 6") as info:
        check_group_advantages(small_only)
    assert ("To rerun this case: rewards = torch.randn(32, generator=torch.Generator()"
            ".manual_seed(31)); group_size = 8") in str(info.value)


def test_advantages_reject_the_whole_batch_mean():
    def whole(rewards, group_size):
        return (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    with pytest.raises(CheckFailed, match="mean of the whole batch"):
        check_group_advantages(whole)


def test_advantages_reject_the_population_std():
    def population(rewards, group_size):
        groups = rewards.view(-1, group_size)
        std = groups.std(dim=1, unbiased=False, keepdim=True)
        return ((groups - groups.mean(dim=1, keepdim=True)) / (std + 1e-4)).view(-1)
    with pytest.raises(CheckFailed, match="population std"):
        check_group_advantages(population)


def test_advantages_reject_no_division_by_the_std():
    def unscaled(rewards, group_size):
        groups = rewards.view(-1, group_size)
        return (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    with pytest.raises(CheckFailed, match="divide it by the group's std"):
        check_group_advantages(unscaled)


def test_advantages_reject_nan_for_an_all_equal_group():
    def no_eps(rewards, group_size):
        groups = rewards.view(-1, group_size)
        return ((groups - groups.mean(dim=1, keepdim=True))
                / groups.std(dim=1, keepdim=True)).view(-1)
    with pytest.raises(CheckFailed, match="got nan(.|\n)*std 0"):
        check_group_advantages(no_eps)


def test_advantages_reject_a_missing_eps_even_without_nan():
    def no_eps(rewards, group_size):
        groups = rewards.view(-1, group_size)
        std = groups.std(dim=1, keepdim=True)
        centred = groups - groups.mean(dim=1, keepdim=True)
        return torch.where(std > 0, centred / std, torch.zeros_like(centred)).view(-1)
    with pytest.raises(CheckFailed, match="1e-4 is missing"):
        check_group_advantages(no_eps)


def test_advantages_reject_strided_groups():
    def strided(rewards, group_size):
        groups = rewards.view(group_size, -1)
        mean, std = groups.mean(dim=0, keepdim=True), groups.std(dim=0, keepdim=True)
        return ((groups - mean) / (std + 1e-4)).reshape(-1)
    with pytest.raises(CheckFailed, match="read strided"):
        check_group_advantages(strided)


def test_advantages_reject_rows_of_the_wrong_length():
    def rows(rewards, group_size):
        groups = rewards.view(group_size, -1)
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
        return ((groups - mean) / (std + 1e-4)).reshape(-1)
    with pytest.raises(CheckFailed, match="view\\(-1, group_size\\)"):
        check_group_advantages(rows)


def test_advantages_reject_a_wrong_shape():
    with pytest.raises(CheckFailed, match="shape"):
        check_group_advantages(lambda r, g: advantages_right(r, g).view(-1, g))


def test_advantages_keep_the_learners_traceback():
    def raising(rewards, group_size):
        return rewards.view(group_size + 1, -1)
    with pytest.raises(CheckFailed, match="raised RuntimeError") as info:
        check_group_advantages(raising)
    assert isinstance(info.value.__cause__, RuntimeError)


# -----------------------------------------------------------------------------
# GRPO's clipped objective


def grpo_terms(new_logp, old_logp, advantages, clip):
    ratio = torch.exp(new_logp - old_logp)
    a = advantages[:, None]
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))


def grpo_right(new_logp, old_logp, advantages, mask, clip):
    return (grpo_terms(new_logp, old_logp, advantages, clip) * mask).sum() / mask.sum()


def test_grpo_accepts_a_correct_answer(capsys):
    check_grpo_objective(grpo_right)
    assert "all 5 checks passed" in capsys.readouterr().out


def test_grpo_accepts_boolean_indexing_and_the_min_of_the_objective():
    def via_index(new_logp, old_logp, advantages, mask, clip):
        ratio = torch.exp(new_logp - old_logp)
        a = advantages[:, None].expand_as(ratio)
        objective = torch.minimum(a * ratio, a * ratio.clamp(1 - clip, 1 + clip))
        return -objective[mask].mean().item()
    check_grpo_objective(via_index)


def test_grpo_rejects_sequence_level_averaging():
    def per_sequence(new_logp, old_logp, advantages, mask, clip):
        terms = grpo_terms(new_logp, old_logp, advantages, clip) * mask
        return (terms.sum(dim=1) / mask.sum(dim=1)).mean()
    with pytest.raises(CheckFailed, match="original GRPO's averaging") as info:
        check_grpo_objective(per_sequence)
    assert "token-level" in str(info.value)


def test_grpo_rejects_an_ignored_mask():
    with pytest.raises(CheckFailed, match="mask was ignored"):
        check_grpo_objective(lambda n, o, a, m, c: grpo_terms(n, o, a, c).mean())


def test_grpo_rejects_division_by_every_position():
    with pytest.raises(CheckFailed, match="divides by every position"):
        check_grpo_objective(lambda n, o, a, m, c: (grpo_terms(n, o, a, c) * m).mean())


def test_grpo_rejects_the_optimistic_loss():
    def optimistic(new_logp, old_logp, advantages, mask, clip):
        ratio = torch.exp(new_logp - old_logp)
        a = advantages[:, None]
        terms = torch.minimum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
        return (terms * mask).sum() / mask.sum()
    with pytest.raises(CheckFailed, match="optimistic"):
        check_grpo_objective(optimistic)


def test_grpo_rejects_no_clipping():
    def unclipped(new_logp, old_logp, advantages, mask, clip):
        terms = -advantages[:, None] * torch.exp(new_logp - old_logp)
        return (terms * mask).sum() / mask.sum()
    with pytest.raises(CheckFailed, match="not clipped"):
        check_grpo_objective(unclipped)


def test_grpo_rejects_the_objective_instead_of_the_loss():
    with pytest.raises(CheckFailed, match="to maximise"):
        check_grpo_objective(lambda n, o, a, m, c: -grpo_right(n, o, a, m, c))


def test_grpo_keeps_the_learners_traceback():
    def broken(new_logp, old_logp, advantages, mask, clip):
        return (grpo_terms(new_logp, old_logp, advantages, clip) * mask[:, :2]).sum()
    with pytest.raises(CheckFailed, match="raised RuntimeError") as info:
        check_grpo_objective(broken)
    assert isinstance(info.value.__cause__, RuntimeError)


# -----------------------------------------------------------------------------
# pass@k


def pass_at_k_right(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_accepts_a_correct_answer(capsys):
    check_pass_at_k(pass_at_k_right)
    assert "all 9 checks passed" in capsys.readouterr().out


def test_pass_at_k_accepts_the_product_form_of_chen_et_al():
    def product(n, c, k):
        if n - c < k:
            return 1.0
        return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
    check_pass_at_k(product)


def test_pass_at_k_accepts_a_tensor():
    check_pass_at_k(lambda n, c, k: torch.tensor(pass_at_k_right(n, c, k), dtype=torch.float64))


def test_pass_at_k_rejects_the_biased_estimate():
    with pytest.raises(CheckFailed, match="biased"):
        check_pass_at_k(lambda n, c, k: 1 - (1 - c / n) ** k)


def test_pass_at_k_rejects_c_over_n():
    with pytest.raises(CheckFailed, match="that is c / n"):
        check_pass_at_k(lambda n, c, k: c / n)


def test_pass_at_k_rejects_k_c_over_n():
    with pytest.raises(CheckFailed, match="k \\* c / n"):
        check_pass_at_k(lambda n, c, k: k * c / n)


def test_pass_at_k_rejects_all_k_correct():
    with pytest.raises(CheckFailed, match="all k samples are correct"):
        check_pass_at_k(lambda n, c, k: math.comb(c, k) / math.comb(n, k))


def test_pass_at_k_rejects_all_k_failing():
    with pytest.raises(CheckFailed, match="all k samples fail"):
        check_pass_at_k(lambda n, c, k: math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_keeps_the_learners_traceback():
    def factorials(n, c, k):
        f = lambda m: float(math.factorial(m))          # noqa: E731
        return 1 - f(n - c) / (f(k) * f(n - c - k)) / (f(n) / (f(k) * f(n - k)))
    with pytest.raises(CheckFailed, match="raised ValueError") as info:
        check_pass_at_k(factorials)
    assert isinstance(info.value.__cause__, ValueError)


# -----------------------------------------------------------------------------
# the three KL estimators

def kl_right(logp, ref_logp):
    log_r = ref_logp - logp
    return -log_r, 0.5 * log_r ** 2, torch.exp(log_r) - 1 - log_r


def test_kl_accepts_a_correct_answer_and_a_list(capsys):
    check_kl_estimators(kl_right)
    check_kl_estimators(lambda lp, lq: list(kl_right(lp.double(), lq.double())))
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


def test_kl_rejects_the_ratio_upside_down():
    def upside_down(logp, ref_logp):
        return kl_right(ref_logp, logp)
    with pytest.raises(CheckFailed, match="(?s)k1: .*upside down"):
        check_kl_estimators(upside_down)


def test_kl_rejects_k3_with_the_ratio_upside_down():
    def k3_flipped(logp, ref_logp):
        k1, k2, _ = kl_right(logp, ref_logp)
        log_r = logp - ref_logp
        return k1, k2, torch.exp(log_r) - 1 - log_r
    with pytest.raises(CheckFailed, match="(?s)k3: .*upside down"):
        check_kl_estimators(k3_flipped)


def test_kl_rejects_k2_without_the_half():
    def no_half(logp, ref_logp):
        k1, _, k3 = kl_right(logp, ref_logp)
        return k1, (ref_logp - logp) ** 2, k3
    with pytest.raises(CheckFailed, match="(?s)k2: .*half the squared"):
        check_kl_estimators(no_half)


def test_kl_rejects_one_tensor_instead_of_three():
    with pytest.raises(CheckFailed, match="tuple of three"):
        check_kl_estimators(lambda lp, lq: kl_right(lp, lq)[2])


# -----------------------------------------------------------------------------
# every random case's rebuild line rebuilds exactly its arguments

NAMES = {
    "check_dpo_loss": ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "beta"),
    "check_group_advantages": ("rewards", "group_size"),
    "check_grpo_objective": ("new_logp", "old_logp", "advantages", "mask", "clip"),
    "check_kl_estimators": ("logp", "ref_logp"),
}


@pytest.mark.parametrize("check", [check_dpo_loss, check_group_advantages, check_grpo_objective,
                                   check_kl_estimators])
def test_rebuild_lines_rebuild_the_arguments(check, monkeypatch):
    import lessons_lib.exercises.ch11 as ch11
    seen = {}
    monkeypatch.setattr(ch11, "run_cases", lambda name, fn, cases: seen.update(name=name,
                                                                              cases=cases))
    check(None)
    random_cases = [case for case in seen["cases"] if case.rebuild]
    assert len(random_cases) == 2
    for case in random_cases:
        scope = {"torch": torch}
        exec(case.rebuild, scope)
        for name, arg in zip(NAMES[seen["name"]], case.args):
            if isinstance(arg, torch.Tensor):
                assert torch.equal(scope[name], arg), (case.description, name)
            else:
                assert scope[name] == arg, (case.description, name)


# -----------------------------------------------------------------------------
# two independent codes checked against each other: the checkers' cases on lessons_lib.rlhf


def test_the_library_passes_the_chapters_checkers(capsys):
    from lessons_lib import rlhf
    from lessons_lib.exercises.ch11 import check_grpo_objective, check_pass_at_k

    def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
        return rlhf.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)[0]

    def grpo(new_logp, old_logp, advantages, mask, clip):
        return rlhf.grpo_losses(new_logp, old_logp, advantages, mask, clip=clip).loss

    check_dpo_loss(dpo)
    check_group_advantages(rlhf.group_advantages)
    check_grpo_objective(grpo)
    check_pass_at_k(rlhf.pass_at_k)
    check_kl_estimators(lambda lp, lq: (rlhf.k1(lp, lq), rlhf.k2(lp, lq), rlhf.k3(lp, lq)))
    assert capsys.readouterr().out.count("checks passed") == 5
