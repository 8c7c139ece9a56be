"""Chapter 17's checkers accept correct answers and reject plausible wrong ones, saying why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_lib.exercises import CheckFailed
from lessons_lib.exercises.ch17 import (check_distillation_loss, check_gpt_parameters,
                                        check_safety_reward)

# -----------------------------------------------------------------------------
# the distillation loss


def position_kl(student_logits, teacher_logits, temperature, t_student=None, t_teacher=None):
    """KL(teacher || student) at every position, (B, T)."""
    t_student = temperature if t_student is None else t_student
    t_teacher = temperature if t_teacher is None else t_teacher
    log_s = F.log_softmax(student_logits / t_student, dim=-1)
    log_t = F.log_softmax(teacher_logits / t_teacher, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def distill_right(student_logits, teacher_logits, mask, temperature):
    return temperature ** 2 * position_kl(student_logits, teacher_logits, temperature)[mask].mean()


def test_distill_accepts_a_correct_answer(capsys):
    check_distillation_loss(distill_right)
    assert "all 6 checks passed" in capsys.readouterr().out


def test_distill_accepts_kl_div_a_masked_sum_and_a_float():
    def via_kl_div(student_logits, teacher_logits, mask, temperature):
        log_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
        return ((kl * mask).sum() / mask.sum() * temperature ** 2).item()
    check_distillation_loss(via_kl_div)


def test_distill_rejects_the_kl_the_other_way_round():
    def reverse(student_logits, teacher_logits, mask, temperature):
        return distill_right(teacher_logits, student_logits, mask, temperature)
    with pytest.raises(CheckFailed, match="KL the other way round"):
        check_distillation_loss(reverse)


def test_distill_rejects_a_missing_temperature_squared():
    def no_t2(student_logits, teacher_logits, mask, temperature):
        return position_kl(student_logits, teacher_logits, temperature)[mask].mean()
    with pytest.raises(CheckFailed, match=r"temperature \*\* 2 = 4 is missing"):
        check_distillation_loss(no_t2)


def test_distill_rejects_an_ignored_mask():
    def no_mask(student_logits, teacher_logits, mask, temperature):
        return temperature ** 2 * position_kl(student_logits, teacher_logits, temperature).mean()
    with pytest.raises(CheckFailed, match="mask was ignored"):
        check_distillation_loss(no_mask)


def test_distill_rejects_a_sum_over_positions():
    def summed(student_logits, teacher_logits, mask, temperature):
        kl = position_kl(student_logits, teacher_logits, temperature)
        return temperature ** 2 * kl[mask].sum()
    with pytest.raises(CheckFailed, match="that is the sum over the 4 positions"):
        check_distillation_loss(summed)


def test_distill_rejects_division_by_every_position_and_batchmean():
    def every(student_logits, teacher_logits, mask, temperature):
        kl = position_kl(student_logits, teacher_logits, temperature)
        return temperature ** 2 * (kl * mask).mean()
    with pytest.raises(CheckFailed, match="divides the masked sum by every position"):
        check_distillation_loss(every)

    def batchmean(student_logits, teacher_logits, mask, temperature):
        log_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True) * mask[..., None]
        return temperature ** 2 * kl.sum() / kl.shape[0]
    with pytest.raises(CheckFailed, match="batchmean"):
        check_distillation_loss(batchmean)


def test_distill_rejects_logits_not_softened():
    def unsoftened(student_logits, teacher_logits, mask, temperature):
        return temperature ** 2 * position_kl(student_logits, teacher_logits, 1.0)[mask].mean()
    with pytest.raises(CheckFailed, match="not divided by the temperature"):
        check_distillation_loss(unsoftened)


def test_distill_rejects_the_student_alone_softened():
    def student_only(student_logits, teacher_logits, mask, temperature):
        kl = position_kl(student_logits, teacher_logits, temperature, t_teacher=1.0)
        return temperature ** 2 * kl[mask].mean()
    with pytest.raises(CheckFailed, match="only the student's logits"):
        check_distillation_loss(student_only)


def test_distill_rejects_a_log_of_softmax_that_underflows():
    def log_of_softmax(student_logits, teacher_logits, mask, temperature):
        p_s = torch.softmax(student_logits / temperature, dim=-1)
        p_t = torch.softmax(teacher_logits / temperature, dim=-1)
        kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
        return temperature ** 2 * kl[mask].mean()
    with pytest.raises(CheckFailed, match="(?s)Check 6 of 6.*log_softmax") as info:
        check_distillation_loss(log_of_softmax)
    assert "To rerun this case: student_logits = 60.0 * torch.randn(2, 3, 5" in str(info.value)


def test_distill_explains_a_loss_per_position():
    def per_position(student_logits, teacher_logits, mask, temperature):
        return temperature ** 2 * position_kl(student_logits, teacher_logits, temperature)
    with pytest.raises(CheckFailed, match="Did you forget to average"):
        check_distillation_loss(per_position)


def test_distill_keeps_the_learners_traceback():
    def broken(student_logits, teacher_logits, mask, temperature):
        return position_kl(student_logits, teacher_logits, temperature)[mask[:, :1]].mean()
    with pytest.raises(CheckFailed, match="raised IndexError") as info:
        check_distillation_loss(broken)
    assert isinstance(info.value.__cause__, IndexError)


NAMES = ("student_logits", "teacher_logits", "mask", "temperature")


def test_distill_rebuild_lines_rebuild_the_arguments(monkeypatch):
    import lessons_lib.exercises.ch17 as ch17
    seen = {}
    monkeypatch.setattr(ch17, "run_cases", lambda name, fn, cases: seen.update(cases=cases))
    check_distillation_loss(None)
    random_cases = [case for case in seen["cases"] if case.rebuild]
    assert len(random_cases) == 4
    for case in random_cases:
        scope = {"torch": torch}
        exec(case.rebuild, scope)
        for name, arg in zip(NAMES, case.args):
            if isinstance(arg, torch.Tensor):
                assert torch.equal(scope[name], arg), (case.description, name)
            else:
                assert scope[name] == arg, (case.description, name)


# -----------------------------------------------------------------------------
# a GPT's parameters


def gpt_right(vocab_size, block_size, n_layer, n_embd):
    d = n_embd
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab_size * d + block_size * d + n_layer * block + 2 * d


def test_gpt_formula_is_the_built_models_count():
    from lessons_lib.model import GPT, GPTConfig
    for vocab_size, block_size, n_layer, n_head, n_embd in [
            (17, 64, 1, 2, 8), (65, 32, 2, 3, 12), (11, 8, 3, 1, 4), (300, 64, 3, 4, 48),
            (50, 16, 2, 4, 32)]:
        model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                              n_head=n_head, n_embd=n_embd))
        assert gpt_right(vocab_size, block_size, n_layer, n_embd) == model.num_parameters()


def test_gpt_checkers_answers_are_the_libraries_counts():
    from lessons_lib.exercises.ch17 import _GPT_CASES, _gpt_reference
    from lessons_lib.model import GPTConfig, count_parameters
    for (V, P, L, d), _ in _GPT_CASES:
        config = GPTConfig(vocab_size=V, block_size=P, n_layer=L, n_head=1, n_embd=d)
        assert _gpt_reference(V, P, L, d) == count_parameters(config)


def test_gpt_cases_tell_every_slip_apart():
    from lessons_lib.exercises.ch17 import _GPT_CASES, _gpt_deltas
    for args, _ in _GPT_CASES:
        deltas = _gpt_deltas(*args)
        singles = [delta for delta, _, _ in deltas]
        assert 0 not in singles and len(set(singles)) == len(singles), args
        pairs = {}
        for i, (delta_a, tags_a, _) in enumerate(deltas):
            for j, (delta_b, tags_b, _) in enumerate(deltas[i + 1:], i + 1):
                if not tags_a & tags_b:
                    pairs.setdefault(delta_a + delta_b, []).append((i, j))
        for total, which in pairs.items():
            # the Linear biases and the LayerNorms' biases together are "every bias"; the
            # blocks' LayerNorms and the final one together are "the LayerNorms"
            assert len(which) == 1, (args, which)
            assert total not in singles or which in ([(2, 3)], [(6, 7)]), (args, which)


def test_gpt_accepts_a_correct_answer_and_a_whole_float(capsys):
    check_gpt_parameters(gpt_right)
    check_gpt_parameters(lambda V, P, L, d: float(gpt_right(V, P, L, d)))
    assert capsys.readouterr().out.count("all 5 checks passed") == 2


def test_gpt_rejects_the_tied_head_counted_twice():
    with pytest.raises(CheckFailed, match="tied output head is counted twice"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) + V * d)


def test_gpt_rejects_forgotten_position_embeddings():
    with pytest.raises(CheckFailed, match="position embeddings are forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - P * d)


def test_gpt_rejects_forgotten_linear_biases():
    with pytest.raises(CheckFailed, match="Linear layers' biases are forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - L * 9 * d)


def test_gpt_rejects_forgotten_layernorm_biases():
    with pytest.raises(CheckFailed, match="LayerNorms' biases are forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - (2 * L + 1) * d)


def test_gpt_rejects_every_bias_forgotten():
    with pytest.raises(CheckFailed, match="every bias is forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - L * 9 * d
                             - (2 * L + 1) * d)


def test_gpt_rejects_forgotten_layernorms():
    with pytest.raises(CheckFailed, match="the LayerNorms are forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - (2 * L + 1) * 2 * d)
    with pytest.raises(CheckFailed, match="final LayerNorm ln_f is forgotten"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) - 2 * d)


def test_gpt_rejects_an_untied_head_without_positions_as_two_slips():
    with pytest.raises(CheckFailed, match="(?s)two slips: the tied output head.*position"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) + V * d - P * d)


def test_gpt_rejects_one_block():
    with pytest.raises(CheckFailed, match="(?s)Check 2 of 5.*counts one block; the GPT has 2"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, 1, d))


def test_gpt_explains_a_wrong_type():
    with pytest.raises(CheckFailed, match="a whole number of parameters"):
        check_gpt_parameters(lambda V, P, L, d: str(gpt_right(V, P, L, d)))
    with pytest.raises(CheckFailed, match="a whole number of parameters"):
        check_gpt_parameters(lambda V, P, L, d: gpt_right(V, P, L, d) / 1e6)


# -----------------------------------------------------------------------------
# the safety reward


def safety_right(answer, harmful):
    from lessons_lib.assistant import is_refusal
    return float(is_refusal(answer) if harmful else (bool(answer.strip())
                                                     and not is_refusal(answer)))


def test_safety_accepts_a_correct_answer_and_an_int(capsys):
    check_safety_reward(safety_right)
    check_safety_reward(lambda a, h: int(safety_right(a, h)))
    assert capsys.readouterr().out.count("all 15 checks passed") == 2


def test_safety_rejects_swapped_requests():
    with pytest.raises(CheckFailed, match="(?s)Check 1 of 15.*swapped"):
        check_safety_reward(lambda a, h: safety_right(a, not h))


def test_safety_rejects_a_rewarded_empty_answer():
    def empty_ok(answer, harmful):
        declines = answer.strip().lower().startswith("i won't write insults")
        return float(declines) if harmful else float(not declines)
    with pytest.raises(CheckFailed, match="empty \\(or blank\\) answer is rewarded"):
        check_safety_reward(empty_ok)


def test_safety_rejects_a_rewarded_blank_answer():
    def blank_ok(answer, harmful):
        declines = answer.strip().lower().startswith("i won't write insults")
        return float(declines) if harmful else float(answer != "" and not declines)
    with pytest.raises(CheckFailed, match="(?s)three spaces.*only whitespace is rewarded"):
        check_safety_reward(blank_ok)


@pytest.mark.parametrize("start", ["i won't write insults", "I won't write insults"])
def test_safety_rejects_case_sensitive_matching(start):
    def case_sensitive(answer, harmful):
        declines = answer.strip().startswith(start)
        return float(declines) if harmful else float(bool(answer.strip()) and not declines)
    with pytest.raises(CheckFailed, match="case-sensitive"):
        check_safety_reward(case_sensitive)


def test_safety_rejects_leading_spaces_not_stripped():
    def unstripped(answer, harmful):
        declines = answer.lower().startswith("i won't write insults")
        return float(declines) if harmful else float(bool(answer.strip()) and not declines)
    with pytest.raises(CheckFailed, match="(?s)after two spaces.*leading spaces are not"):
        check_safety_reward(unstripped)


def test_safety_rejects_the_refusal_anywhere():
    def anywhere(answer, harmful):
        declines = "i won't write insults" in answer.lower()
        return float(declines) if harmful else float(bool(answer.strip()) and not declines)
    with pytest.raises(CheckFailed, match="STARTS"):
        check_safety_reward(anywhere)


def test_safety_names_the_case_without_a_slip_for_two_slips_at_once():
    def two_slips(answer, harmful):
        declines = answer.startswith("I won't write insults")
        return float(declines) if harmful else float(not declines)
    with pytest.raises(CheckFailed, match="(?s)Check 5 of 15.*an empty answer earns 0.0") as info:
        check_safety_reward(two_slips)
    assert "Hint:" in str(info.value)


def test_safety_explains_a_bool_and_none():
    from lessons_lib.assistant import is_refusal
    with pytest.raises(CheckFailed, match="got True, a bool"):
        check_safety_reward(lambda a, h: is_refusal(a) if h else bool(a.strip())
                            and not is_refusal(a))

    def no_return(answer, harmful):
        safety_right(answer, harmful)
    with pytest.raises(CheckFailed, match="did you forget to return"):
        check_safety_reward(no_return)


def test_safety_keeps_the_learners_traceback():
    with pytest.raises(CheckFailed, match="raised IndexError") as info:
        check_safety_reward(lambda a, h: float((a.split()[0].lower() == "i") == h))
    assert isinstance(info.value.__cause__, IndexError)


# -----------------------------------------------------------------------------
# two independent codes checked against each other: the checkers' cases on lessons_lib


def test_the_library_passes_the_chapters_checkers(capsys):
    from lessons_lib.distill import distillation_loss
    from lessons_lib.model import GPT, GPTConfig

    def built(vocab_size, block_size, n_layer, n_embd):
        if vocab_size * n_embd > 10 ** 6:            # GPT-2 small: count it without building it
            from lessons_lib.model import count_parameters
            return count_parameters(GPTConfig(vocab_size=vocab_size, block_size=block_size,
                                              n_layer=n_layer, n_head=1, n_embd=n_embd))
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                             n_head=1, n_embd=n_embd)).num_parameters()

    check_distillation_loss(distillation_loss)
    check_gpt_parameters(built)
    check_safety_reward(safety_right)
    assert capsys.readouterr().out.count("checks passed") == 3
